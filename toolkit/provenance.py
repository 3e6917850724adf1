"""Provenance: a manifest saying what produced a result, and checkpoints that never lose work and
never run code.

A checkpoint holds tensors and plain data only (dict, list, tuple, str, int, float, bool, None,
tensors; a generator's state is a tensor) and is read with ``torch.load(weights_only=True)``, so a
file someone sent you cannot execute anything when loaded. Objects a protocol must keep (an event
queue of dataclasses) are encoded with :func:`to_plain` and rebuilt with :func:`from_plain` from
an explicit registry of the classes that may be rebuilt, never from a class the file names.
"""
from __future__ import annotations

import dataclasses
import os
import pickletools
import platform
import re
import tempfile
import zipfile
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from toolkit.wire import Packet

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


# -- plain data -------------------------------------------------------------------------------------
SCALARS = (str, int, float, bool, type(None))  # exact types: a numpy float is no plain float
OBJECT_KEY = "__leaklab_object__"  # {OBJECT_KEY: i} stands for entry i of an encoding's object table
PICKLED_FORMATS = frozenset({"leaklab-federated-1"})  # written before checkpoints were plain data


def check_plain(value: Any, where: str = "state") -> None:
    """Raise a TypeError naming the first part of ``value`` (e.g. ``state['queue'][3]``) that is
    not a tensor or plain data, i.e. that ``torch.load(weights_only=True)`` would refuse."""
    if type(value) in SCALARS or type(value) is Tensor:
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
        return
    if type(value) is dict:
        for key, item in value.items():
            if type(key) not in SCALARS:
                raise TypeError(f"{where} has a key of type {type(key).__name__}: keys must be str, int, "
                                f"float, bool or None")
            check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(f"{where} is a {type(value).__qualname__}: a checkpoint holds tensors and plain data only "
                    f"(encode objects with toolkit.provenance.to_plain)")


def to_plain(value: Any, classes: Mapping[str, type]) -> dict[str, Any]:
    """Encode ``value`` as plain data: each instance of a dataclass in ``classes`` (name -> class)
    becomes one entry of an object table, listed once however often it is referenced (shared
    objects stay shared), after the objects it refers to; references are ``{OBJECT_KEY: index}``.

    Returns ``{"objects": [{"class": name, "fields": {...}}, ...], "value": encoded value}``.
    Raises a TypeError naming any other kind of object, and a ValueError for a cycle or a dict
    that uses the reserved key ``OBJECT_KEY``.

    Example:
        >>> @dataclasses.dataclass
        ... class Batch:
        ...     rows: int
        >>> batch = Batch(3)
        >>> plain = to_plain([batch, batch], {"Batch": Batch})
        >>> plain
        {'objects': [{'class': 'Batch', 'fields': {'rows': 3}}], 'value': [{'__leaklab_object__': 0}, {'__leaklab_object__': 0}]}
        >>> first, second = from_plain(plain, {"Batch": Batch})
        >>> first is second, first
        (True, Batch(rows=3))
    """
    names = {cls: name for name, cls in _registry(classes).items()}
    table: list[dict[str, Any]] = []
    index: dict[int, int] = {}  # id(object) -> its entry
    busy: set[int] = set()

    def encode(v: Any, where: str) -> Any:
        if type(v) in SCALARS or type(v) is Tensor:
            return v
        if type(v) in (list, tuple):
            return type(v)(encode(x, f"{where}[{i}]") for i, x in enumerate(v))
        if type(v) is dict:
            if OBJECT_KEY in v:
                raise ValueError(f"{where} uses the reserved key {OBJECT_KEY!r}")
            return {k: encode(x, f"{where}[{k!r}]") for k, x in v.items()}
        name = names.get(type(v))
        if name is None:
            raise TypeError(f"{where} is a {type(v).__qualname__}, which a checkpoint cannot hold: only tensors, "
                            f"plain data and the registered classes {sorted(names.values())}")
        if id(v) not in index:
            if id(v) in busy:
                raise ValueError(f"{where} refers back to itself: a checkpoint cannot hold a cycle")
            busy.add(id(v))
            fields = {f.name: encode(getattr(v, f.name), f"{where}.{f.name}") for f in dataclasses.fields(v)}
            busy.discard(id(v))
            index[id(v)] = len(table)
            table.append({"class": name, "fields": fields})
        return {OBJECT_KEY: index[id(v)]}

    return {"objects": table, "value": encode(value, "state")}


def from_plain(data: Any, classes: Mapping[str, type], *, what: str = "the checkpoint") -> Any:
    """Inverse of :func:`to_plain`: rebuild the encoded value, each object once (so shared objects
    are shared again), constructing only classes of the registry ``classes``. Raises a
    ValueError starting with ``what`` for anything else: an unknown class, fields that differ
    from the class's, a reference to an object not defined before it."""
    registry = _registry(classes)
    if type(data) is not dict or set(data) != {"objects", "value"} or type(data["objects"]) is not list:
        raise ValueError(f"{what} is not encoded plain data (expected the keys 'objects' and 'value')")
    objects: list[Any] = []

    def decode(v: Any, where: str) -> Any:
        if type(v) in (list, tuple):
            return type(v)(decode(x, where) for x in v)
        if type(v) is dict:
            if OBJECT_KEY not in v:
                return {k: decode(x, where) for k, x in v.items()}
            i = v[OBJECT_KEY]
            if len(v) != 1 or type(i) is not int or not 0 <= i < len(objects):
                raise ValueError(f"{what}: {where} refers to object {i!r}, which is not defined before it")
            return objects[i]
        return v

    for i, entry in enumerate(data["objects"]):
        where = f"objects[{i}]"
        if type(entry) is not dict or set(entry) != {"class", "fields"} or type(entry["fields"]) is not dict:
            raise ValueError(f"{what}: {where} is not an encoded object")
        cls = registry.get(entry["class"]) if isinstance(entry["class"], str) else None
        if cls is None:
            raise ValueError(f"{what}: {where} has the unknown class {entry['class']!r}; a checkpoint may only "
                             f"rebuild {sorted(registry)}")
        expected = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in expected if n not in entry["fields"]]
        extra = sorted(str(n) for n in entry["fields"] if n not in expected)
        if missing or extra:
            problem = f"fields {missing} missing" if missing else f"unknown fields {extra}"
            raise ValueError(f"{what}: the {entry['class']} at {where} has {problem} (the checkpoint was made "
                             f"by another version of LeakLab: re-create it)")
        try:
            objects.append(cls(**{n: decode(entry["fields"][n], where) for n in expected}))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{what}: cannot rebuild the {entry['class']} at {where}: {err}") from None
    return decode(data["value"], "value")


def _registry(classes: Mapping[str, type]) -> dict[str, type]:
    for name, cls in classes.items():
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)) or not all(
                f.init for f in dataclasses.fields(cls)):
            raise TypeError(f"registered class {name!r} must be a dataclass whose fields are all __init__ arguments")
    return dict(classes)


def packet_classes() -> dict[str, type]:
    """The :class:`~toolkit.wire.Packet` dataclasses defined so far, by module and name: what a
    wire transcript may hold besides tensors (their fields are tensors and plain metadata)."""
    found, todo = {}, list(Packet.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if dataclasses.is_dataclass(cls):
            found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return found


# -- files ------------------------------------------------------------------------------------------
def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` with ``torch.save`` atomically: a crash mid-write leaves the old file whole.

    ``state`` must be plain data (see :func:`check_plain`) with a ``"format"`` string; anything
    else is refused with a TypeError before the file is touched.
    """
    if type(state) is not dict or not isinstance(state.get("format"), str):
        raise TypeError(f"a checkpoint is a dict with a 'format' string, got {type(state).__name__}")
    check_plain(state)
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


def load_checkpoint(path: str | Path, format: str | None = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with ``torch.load(weights_only=True)``:
    nothing in the file is executed, whoever made it.

    Args:
        path: the file.
        format: the format string the caller reads (e.g. ``"leaklab-federated-2"``); None accepts any.

    Raises:
        ValueError: naming ``path``, when there is no file, when it holds objects other than
            tensors and plain data, has no format, another format, or an old pickled one (which
            must be re-created: older checkpoints were pickles and cannot be loaded safely).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001  (any failure to read means: not ours, refused)
        old = _pickled_format(path)
        if old is not None:
            raise _old_format(path, old) from None
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f" (it asks for {found.group(1)})" if found else ""
        raise ValueError(f"{path} is not a LeakLab checkpoint: it holds objects other than tensors and plain "
                         f"data{what}, or is no torch file at all; it was not loaded") from None
    found = state.get("format") if type(state) is dict else None
    if not isinstance(found, str):
        raise ValueError(f"{path} is not a LeakLab checkpoint: it has no format field")
    if found in PICKLED_FORMATS:
        raise _old_format(path, found)
    if format is not None and found != format:
        raise ValueError(f"{path} is not a LeakLab checkpoint of format {format!r}: it says {found!r}")
    return state


def _old_format(path: Path, found: str) -> ValueError:
    return ValueError(f"{path} is an old {found} checkpoint, written as a pickle, which cannot be loaded "
                      f"safely: re-create it with this version of LeakLab")


def _pickled_format(path: Path) -> str | None:
    """The old format string an unloadable torch file declares, read by parsing (never running)
    its pickle, or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            if name is None:
                return None
            with archive.open(name) as f:
                head = f.read(1 << 16)  # the format is the first key of the state
        for _, arg, _ in pickletools.genops(head):
            if isinstance(arg, str) and arg in PICKLED_FORMATS:
                return arg
    except Exception:  # noqa: BLE001  (not a zip, or a truncated pickle: no old format found)
        return None
    return None
