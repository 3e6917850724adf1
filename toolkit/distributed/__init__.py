"""Real multi-process runs over TCP (torch.distributed, gloo): a process group that carries
tensors and plain metadata only (:func:`join`, :class:`Group`), optional authenticated encryption
with per-pair keys (:mod:`toolkit.distributed.crypto`), and a Wire transport that crosses
processes (:class:`ProcessTransport`): the same protocol code runs in every process. Ring
training across processes (:func:`run_ring`: discovery over the store, agreed liveness, a killed
peer re-forms the ring) and a local launcher (:func:`launch`, ``python -m toolkit.distributed``).
"""
from toolkit.distributed.group import CIPHERS, Group, join
from toolkit.distributed.transport import ProcessTransport
from toolkit.distributed.launch import Launch, free_port, launch  # noqa: E402  (the function, over the submodule)

_LAZY = {"Roster": "discovery", "discover": "discovery", "RingRun": "ring", "StoreLiveness": "ring",
         "run_ring": "ring"}


def __getattr__(name: str):
    """The ring's names, imported on first use (they pull in toolkit.decentralized and federated)."""
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f"toolkit.distributed.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'toolkit.distributed' has no attribute {name!r}")


__all__ = ["CIPHERS", "Group", "Launch", "ProcessTransport", "RingRun", "Roster", "StoreLiveness", "discover",
           "free_port", "join", "launch", "run_ring"]
