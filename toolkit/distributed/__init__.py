"""Real multi-process runs over TCP (torch.distributed, gloo): a process group that carries
tensors and plain metadata only (:func:`join`, :class:`Group`), optional authenticated encryption
with per-pair keys (:mod:`toolkit.distributed.crypto`), and a Wire transport that crosses
processes (:class:`ProcessTransport`): the same protocol code runs in every process.
"""
from toolkit.distributed.group import CIPHERS, Group, join
from toolkit.distributed.transport import ProcessTransport

__all__ = ["CIPHERS", "Group", "ProcessTransport", "join"]
