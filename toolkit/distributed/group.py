"""A process group over TCP (torch.distributed gloo) that carries tensors and plain metadata only.

``join`` is the rendezvous: rank 0 hosts a ``TCPStore`` at ``addr:port``, every rank registers
under its rank (a second process claiming a taken rank is refused), waits until all have joined
(a ``TimeoutError`` names who is missing), and opens the gloo process group. With ``encrypt``
each process also publishes an X25519 public key and derives per-pair AEAD keys
(:mod:`toolkit.distributed.crypto`).

Messages are a fixed int64 header then the payload bytes (:mod:`toolkit.distributed.framing`):
nothing is pickled, no ``send_object_list``, nothing received is ``torch.load``-ed. Every wait has a
timeout: a peer that does not answer gives a ``TimeoutError`` naming it and the kind. gloo closes
the connection to a peer after a timed-out operation, so treat a timeout as that peer being gone.

The store is plain TCP with no authentication and gloo has no TLS: on an untrusted network use
``encrypt=...`` (which protects payloads and binds headers, not the unauthenticated key exchange),
a VPN or a private network.
"""
from __future__ import annotations

import datetime
import os
import time

import torch
import torch.distributed as dist
from torch import Tensor

from toolkit.distributed import framing

HEADER_TAG, PAYLOAD_TAG = 1, 2
CIPHERS = (None, "aes-gcm", "chacha20-poly1305")
_PREFIX = "leaklab/"


def join(rank: int, world_size: int, *, addr: str = "127.0.0.1", port: int, timeout: float = 30.0,
         encrypt: str | None = None) -> Group:
    """Join (rank 0: host) a group of ``world_size`` processes at ``addr:port``; see :class:`Group`."""
    for name, value in (("rank", rank), ("world_size", world_size), ("port", port)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank {rank} and world_size {world_size}")
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, got {port}")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if encrypt not in CIPHERS:
        raise ValueError(f"encrypt must be one of {CIPHERS}, got {encrypt!r}")
    if dist.is_initialized():
        raise RuntimeError("this process is already in a torch.distributed group; close it before joining another")
    return Group(rank, world_size, addr=addr, port=port, timeout=float(timeout), encrypt=encrypt)


class Group:
    """One process's membership of a group: point-to-point tensors and a key-value store.

    Attributes: ``rank``, ``world_size``, ``store`` (the TCPStore), ``timeout`` (seconds, the
    default for every wait), ``encrypt`` (None or the cipher name), ``max_bytes`` (largest payload
    accepted from a peer).
    """

    def __init__(self, rank: int, world_size: int, *, addr: str, port: int, timeout: float,
                 encrypt: str | None):
        self.rank, self.world_size, self.timeout, self.encrypt = rank, world_size, timeout, encrypt
        self.addr, self.port = addr, port
        self.max_bytes = 1 << 34
        self._sent = [0] * world_size  # next sequence number per destination
        self._received = [0] * world_size  # next expected sequence number per source
        self._closed = False
        delta = datetime.timedelta(seconds=timeout)
        try:
            self.store = dist.TCPStore(addr, port, world_size, rank == 0, timeout=delta, wait_for_workers=False)
        except Exception as e:  # noqa: BLE001  (torch raises RuntimeError / DistStoreError / DistNetworkError)
            if rank == 0:
                raise OSError(f"rank 0 could not host the store at {addr}:{port}: {e}") from e
            raise TimeoutError(f"rank {rank} could not reach the store at {addr}:{port} within {timeout:g} s "
                               f"(rank 0 hosts it: is it running, and is the port open?): {e}") from e
        self._cipher = None
        if encrypt is not None:
            from toolkit.distributed.crypto import KeyExchange
            self._kx = KeyExchange(encrypt)
        self._register()
        dist.init_process_group("gloo", store=dist.PrefixStore(_PREFIX + "pg", self.store), rank=rank,
                                world_size=world_size, timeout=delta)
        if encrypt is not None:
            peers = {r: bytes.fromhex(self.get(f"pub/{r}")) for r in range(world_size) if r != rank}
            self._cipher = self._kx.derive(rank, peers)

    def _register(self) -> None:
        token = os.urandom(8).hex()
        got = self.store.compare_set(f"{_PREFIX}joined/{self.rank}", "", token).decode()
        if got != token:
            self.store.add(f"{_PREFIX}refused/{self.rank}", 1)  # the others can see a second claim was refused
            raise RuntimeError(f"rank {self.rank} has already joined this group at {self.addr}:{self.port} "
                               f"(another process registered as rank {self.rank})")
        self.set(f"cipher/{self.rank}", self.encrypt or "none")
        if self.encrypt is not None:
            self.set(f"pub/{self.rank}", self._kx.public.hex())
        deadline = time.monotonic() + self.timeout
        missing = list(range(self.world_size))
        while missing:
            try:
                missing = [r for r in missing if not self.store.check([f"{_PREFIX}joined/{r}"])]
            except Exception as e:  # noqa: BLE001  (torch raises DistNetworkError when the host has gone)
                raise ConnectionError(f"rank {self.rank} lost the store at {self.addr}:{self.port} (rank 0 hosts "
                                      f"it and has left) while rank(s) {missing} had not joined") from e
            if missing and time.monotonic() > deadline:
                raise TimeoutError(f"rank {self.rank}: rank(s) {missing} did not join the group at "
                                   f"{self.addr}:{self.port} within {self.timeout:g} s (world size {self.world_size})")
            if missing:
                time.sleep(0.02)
        for r in range(self.world_size):
            if not self.wait_key(f"cipher/{r}", self.timeout):
                raise TimeoutError(f"rank {r} joined but never published its encryption setting")
            theirs = self.get(f"cipher/{r}")
            if theirs != (self.encrypt or "none"):
                raise ValueError(f"rank {self.rank} joined with encrypt={self.encrypt!r} but rank {r} with "
                                 f"{theirs!r}: every process must use the same setting")

    # -- point to point ------------------------------------------------------------------
    def send(self, tensor: Tensor, dst: int, *, kind: str = "", timeout: float | None = None) -> None:
        """Send ``tensor`` (a header, then its bytes; encrypted when the group is) to rank ``dst``."""
        work = self.isend(tensor, dst, kind=kind)
        work.wait(timeout)

    def isend(self, tensor: Tensor, dst: int, *, kind: str = "") -> PendingSend:
        """Start sending ``tensor`` to ``dst``; ``.wait(timeout)`` on the result completes it.
        Sends to one destination are received in the order they were started."""
        self._check_open()
        if not isinstance(tensor, Tensor):
            raise TypeError(f"send needs a Tensor, got {type(tensor).__name__}")
        self._check_peer(dst, "dst")
        seq = self._sent[dst]
        cipher = framing.CIPHER_CODES[self.encrypt]
        header = framing.make_header(tensor, cipher=cipher, seq=seq, src=self.rank, dst=dst, kind=kind)
        payload = framing.as_bytes(tensor)
        if self._cipher is not None:
            aad = framing.Header(header, src=self.rank).aad(src=self.rank, dst=dst, seq=seq)
            payload = self._cipher.seal(payload, dst=dst, seq=seq, aad=aad)
        self._sent[dst] += 1
        return self._post(header, payload, dst, kind)

    def _post(self, header: Tensor, payload: Tensor, dst: int, kind: str) -> PendingSend:
        first = torch.zeros(framing.FIRST_BYTES, dtype=torch.uint8)  # header + the payload's first bytes
        first[:framing.HEADER_BYTES] = header.view(torch.uint8)
        inline = min(payload.numel(), framing.INLINE)
        first[framing.HEADER_BYTES:framing.HEADER_BYTES + inline] = payload[:inline]
        works = [self._start(dist.isend, first, dst, HEADER_TAG, kind, "sending")]
        if payload.numel() > inline:
            works.append(self._start(dist.isend, payload[inline:], dst, PAYLOAD_TAG, kind, "sending"))
        return PendingSend(self, works, (first, payload), dst, kind)

    def recv(self, src: int | None = None, *, like: Tensor | None = None, kind: str = "",
             timeout: float | None = None) -> tuple[Tensor, int]:
        """Receive one tensor from rank ``src`` (any rank if None); returns ``(tensor, sender)``.

        ``like``: the expected dtype and shape (a mismatch is a ValueError naming both); ``kind``:
        the expected kind ("" accepts any). A tampered encrypted message is a ValueError saying it
        failed authentication, naming the sender; no answer within ``timeout`` is a TimeoutError.
        """
        self._check_open()
        if src is not None:
            self._check_peer(src, "src")
        first = torch.zeros(framing.FIRST_BYTES, dtype=torch.uint8)
        work = self._start(dist.irecv, first, src, HEADER_TAG, kind, "the header of")
        who = f"rank {src}" if src is not None else "any rank"
        self._wait(work, who, kind, "the header of", timeout)
        if src is None:
            src = work._source_rank() if hasattr(work, "_source_rank") else work.source_rank()
        header = framing.Header(first[:framing.HEADER_BYTES].view(torch.int64), src=src)
        if header.nbytes > self.max_bytes:
            raise ValueError(f"rank {src} announced a {header.nbytes:,}-byte message ({header.kind!r}), over the "
                             f"{self.max_bytes:,}-byte limit; the connection to it is now out of step")
        raw = torch.empty(header.nbytes, dtype=torch.uint8)
        inline = min(header.nbytes, framing.INLINE)
        raw[:inline] = first[framing.HEADER_BYTES:framing.HEADER_BYTES + inline]
        if header.nbytes > inline:
            work = self._start(dist.irecv, raw[inline:], src, PAYLOAD_TAG, kind or header.kind, "the payload of")
            self._wait(work, f"rank {src}", kind or header.kind, "the payload of", timeout)
        seq = self._received[src]
        if header.seq < seq:  # an old frame sent again: rejected without consuming the next sequence number
            verdict = "failed authentication" if self._cipher is not None else "was rejected"
            raise ValueError(f"message {header.kind!r} from rank {src} {verdict} as a replay: "
                             f"sequence number {header.seq}, expected {seq}")
        self._received[src] += 1
        if self._cipher is not None:
            aad = header.aad(src=src, dst=self.rank, seq=seq)
            if header.cipher != framing.CIPHER_CODES[self.encrypt]:
                raise ValueError(f"message {header.kind!r} from rank {src} failed authentication: it is not "
                                 f"encrypted with {self.encrypt}")
            raw = self._cipher.open(raw, src=src, seq=seq, aad=aad, kind=header.kind)
        else:
            if header.cipher:
                raise ValueError(f"rank {src} sent an encrypted message to a group without encryption")
            if (header.seq, header.src, header.dst) != (seq, src, self.rank):
                raise ValueError(f"message {header.kind!r} from rank {src} is out of step: header says seq "
                                 f"{header.seq} from {header.src} to {header.dst}, expected seq {seq} from {src} "
                                 f"to {self.rank} (replayed, redirected or lost message)")
        if kind and header.kind != kind:
            raise ValueError(f"rank {self.rank} expected {kind!r} from rank {src}, got {header.kind!r} "
                             f"(the processes' protocols are out of step)")
        if like is not None and (like.dtype != header.dtype or tuple(like.shape) != header.shape):
            raise ValueError(f"rank {self.rank} expected {kind or header.kind!r} from rank {src} as "
                             f"{tuple(like.shape)} {like.dtype}, got {header.shape} {header.dtype}")
        return framing.from_bytes(raw, header.dtype, header.shape), src

    def _start(self, op, tensor: Tensor, peer: int | None, tag: int, kind: str, what: str):
        """``dist.isend`` / ``dist.irecv``; gloo refuses at once on a connection it has closed."""
        try:
            return op(tensor, peer, tag=tag)
        except RuntimeError as e:
            who = f"rank {peer}" if peer is not None else "any rank"
            raise ConnectionError(f"rank {self.rank}: lost the connection to {who} ({what} {kind!r}): "
                                  f"{str(e).splitlines()[0][:300]}") from None

    def _wait(self, work, who: str, kind: str, what: str, timeout: float | None) -> None:
        seconds = self.timeout if timeout is None else timeout
        try:
            work.wait(datetime.timedelta(seconds=seconds))
        except RuntimeError as e:
            message = str(e)
            if "Timed out" in message or "timed out" in message or "Timeout" in message:
                raise TimeoutError(f"rank {self.rank}: {who} did not answer within {seconds:g} s "
                                   f"({what} {kind!r}); the connection to it is closed") from None
            raise ConnectionError(f"rank {self.rank}: lost the connection to {who} ({what} {kind!r}): "
                                  f"{message.splitlines()[0].split('. This is typically')[0][:300]}") from None

    def _check_peer(self, peer: int, name: str) -> None:
        if isinstance(peer, bool) or not isinstance(peer, int) or not 0 <= peer < self.world_size:
            raise ValueError(f"{name} must be a rank in [0, {self.world_size}), got {peer!r}")
        if peer == self.rank:
            raise ValueError(f"rank {self.rank} cannot send to or receive from itself")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"rank {self.rank}: the group is closed")

    # -- metadata through the store ------------------------------------------------------
    def set(self, key: str, value: str) -> None:
        """Store a plain string (e.g. JSON) under ``key`` for every rank to read."""
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"store keys and values are str, got {type(key).__name__} and {type(value).__name__}")
        self.store.set(_PREFIX + "kv/" + key, value)

    def get(self, key: str, timeout: float | None = None) -> str:
        """The string stored under ``key``, waiting up to ``timeout`` s for it (TimeoutError naming it)."""
        seconds = self.timeout if timeout is None else timeout
        if not self.wait_key(key, seconds):
            raise TimeoutError(f"rank {self.rank}: store key {key!r} was not set within {seconds:g} s")
        return self.store.get(_PREFIX + "kv/" + key).decode()

    def wait_key(self, key: str, timeout: float) -> bool:
        """Whether ``key`` is set within ``timeout`` seconds (polls; never raises on timeout)."""
        deadline = time.monotonic() + timeout
        while not self.store.check([_PREFIX + "kv/" + key]):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def agree(self, key: str, proposal: str) -> str:
        """The first proposal made for ``key`` by any rank (TCPStore.compare_set); all ranks see it."""
        if not isinstance(proposal, str) or not proposal:
            raise ValueError(f"a proposal must be a non-empty str, got {proposal!r}")
        return self.store.compare_set(_PREFIX + "kv/" + key, "", proposal).decode()

    # -- lifetime ------------------------------------------------------------------------
    def close(self, timeout: float = 5.0) -> None:
        """Leave the group (idempotent). Rank 0 hosts the store, so it waits up to ``timeout`` s
        for the others to leave first."""
        if self._closed:
            return
        self._closed = True
        try:
            self.set(f"left/{self.rank}", "1")
            if self.rank == 0:
                for r in range(1, self.world_size):
                    self.wait_key(f"left/{r}", timeout)
        except Exception:  # noqa: BLE001  (the store may already be gone; leaving must not fail)
            pass
        if dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Group(rank={self.rank}, world_size={self.world_size}, {self.addr}:{self.port}, "
                f"encrypt={self.encrypt!r}{', closed' if self._closed else ''})")


class PendingSend:
    """A send in flight; keeps its buffers alive until ``wait`` returns."""

    def __init__(self, group: Group, works: list, buffers: tuple, dst: int, kind: str):
        self.group, self.works, self.buffers, self.dst, self.kind = group, works, buffers, dst, kind

    def wait(self, timeout: float | None = None) -> None:
        for work in self.works:
            self.group._wait(work, f"rank {self.dst}", self.kind, "sending", timeout)
        self.works, self.buffers = [], ()
