"""Provenance: a manifest saying what produced a result, and checkpoints that never lose work."""
from __future__ import annotations

import dataclasses
import os
import platform
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("leaklab", "torch", "numpy", "pandas", "scikit-learn", "scipy")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def manifest(config: Any = None, **extra: Any) -> dict[str, Any]:
    """Package versions, platform, seed and full config: enough to trace a figure to its run.

    Args:
        config: a dataclass config (recorded in full with ``asdict``), or None.
        **extra: anything else worth recording (e.g. the aggregator's repr).
    """
    record: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
    }
    if config is not None:
        record["config"] = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        record["seed"] = record["config"].get("seed")
    record.update(extra)
    return record


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` with ``torch.save`` atomically: a crash mid-write leaves the old file whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (a trusted file: it is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path}")
    state = torch.load(path, weights_only=False)
    if not isinstance(state, dict) or "format" not in state:
        raise ValueError(f"{path} is not a LeakLab checkpoint")
    return state
