"""Hash commitments to clients' tensors, for verifiable participation in an aggregation round.

A client commits to the tensor it will send before the server asks for it, and opens the
commitment later (e.g. at unmasking in secure aggregation, Bonawitz et al., "Practical secure
aggregation for privacy-preserving machine learning", 2017); a client whose opening fails is
named and nothing is released. The commitment is the hash commitment of the random-oracle model
(Halevi & Micali, "Practical and provably-secure commitment schemes from collision-free hashing",
1996): ``SHA-256(domain tag, client id, round, nonce, encoded tensor)``, every field
length-prefixed so no two inputs encode alike, with a fresh 256-bit nonce from :mod:`secrets`.

- Binding: a different tensor, client id, round or nonce gives a different hash (opening another
  value means a SHA-256 collision).
- Hiding: the 256-bit nonce makes two commitments to the same tensor differ and the hash reveal
  nothing usable about it without the nonce.
- Canonical encoding: the tensor's dtype name, its shape and its raw bytes, little-endian, in its
  own dtype. The commitment binds dtype and shape as well as values: ``float32`` and ``float64``
  tensors of equal values, or a ``(2, 3)`` and a ``(6,)`` tensor of the same entries, commit
  differently, and so do ``0.0`` and ``-0.0``. Commit to exactly what will be sent.

Example:
    >>> import torch
    >>> c, opening = commit(torch.ones(3), "client:0", 1)
    >>> len(c), verify(c, torch.ones(3), opening, "client:0", 1), verify(c, torch.ones(3), opening, "client:0", 2)
    (32, True, False)
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch

DOMAIN = b"leaklab/commitment/sha256/v1"
NONCE_BYTES = 32  # 256 bits


@dataclass(frozen=True, repr=False)
class Opening:
    """What opens a commitment besides the tensor, client id and round: its 256-bit nonce."""

    nonce: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.nonce, bytes) or len(self.nonce) != NONCE_BYTES:
            raise ValueError(f"Opening.nonce must be {NONCE_BYTES} bytes")

    def __repr__(self) -> str:  # the nonce is secret until the opening is sent
        return "Opening(nonce=<32 bytes>)"


def _field(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data


def _check_id_round(client_id: str, round: int) -> None:
    if not isinstance(client_id, str) or not client_id:
        raise ValueError(f"client_id must be a non-empty str, got {client_id!r}")
    _check_round(round)


def _check_round(round: int) -> None:
    if isinstance(round, bool) or not isinstance(round, int) or not 0 <= round < 2 ** 63:
        raise ValueError(f"round must be an int >= 0, got {round!r}")


def encode_tensor(tensor: torch.Tensor) -> bytes:
    """Canonical bytes of ``tensor``: dtype name, shape, then its values little-endian in its own dtype."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout is not torch.strided:
        raise ValueError(f"tensor must be dense (strided), got layout {tensor.layout}")
    t = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else torch.empty(0, dtype=torch.uint8).numpy()
    if sys.byteorder != "little" and t.element_size() > 1:
        raw = raw.reshape(-1, t.element_size())[:, ::-1]
    dims = b"".join(struct.pack(">Q", d) for d in t.shape)
    return _field(str(t.dtype).encode()) + _field(struct.pack(">Q", t.dim()) + dims) + _field(raw.tobytes())


def _digest(encoded: bytes, client_id: str, round: int, nonce: bytes) -> bytes:
    h = hashlib.sha256()
    for part in (DOMAIN, client_id.encode("utf-8"), struct.pack(">Q", round), nonce, encoded):
        h.update(_field(part))
    return h.digest()


def commit(tensor: torch.Tensor, client_id: str, round: int) -> tuple[bytes, Opening]:
    """Commit to ``tensor`` as ``client_id`` in ``round``: ``(32-byte commitment, opening)``.

    Send the commitment now; keep the opening (its nonce) secret until the tensor is revealed.
    """
    _check_id_round(client_id, round)
    encoded = encode_tensor(tensor)
    opening = Opening(secrets.token_bytes(NONCE_BYTES))
    return _digest(encoded, client_id, round, opening.nonce), opening


def verify(commitment: bytes, tensor: torch.Tensor, opening: Opening, client_id: str, round: int) -> bool:
    """Whether ``(tensor, opening)`` opens ``commitment`` for ``client_id`` in ``round``.

    A tensor, id, round or nonce other than the committed ones gives ``False``; malformed
    arguments (not a 32-byte commitment, not an :class:`Opening`, ...) are a ``ValueError``.
    """
    if not isinstance(commitment, bytes) or len(commitment) != hashlib.sha256().digest_size:
        raise ValueError("commitment must be the 32 bytes returned by commit()")
    if not isinstance(opening, Opening):
        raise ValueError(f"opening must be an Opening, got {type(opening).__name__}")
    _check_id_round(client_id, round)
    expected = _digest(encode_tensor(tensor), client_id, round, opening.nonce)
    return hmac.compare_digest(expected, commitment)


def check_openings(commitments: Mapping[str, bytes], openings: Mapping[str, tuple[torch.Tensor, Opening]],
                   round: int) -> dict[str, torch.Tensor]:
    """Check every client's opening for ``round``; return ``{client id: tensor}`` only if all verify.

    ``commitments`` maps client id to its commitment; ``openings`` maps client id to the
    ``(tensor, opening)`` it revealed. A client whose opening does not verify, or is malformed,
    a committed client without an opening and an opening without a commitment are each named in
    one ``ValueError`` listing all of them, and no tensor is released.
    """
    if not isinstance(commitments, Mapping) or not isinstance(openings, Mapping):
        raise ValueError("commitments and openings must be mappings keyed by client id")
    _check_round(round)
    problems = []
    for cid in sorted(set(commitments) | set(openings), key=str):
        if cid not in openings:
            problems.append(f"{cid!r} (committed, no opening)")
            continue
        if cid not in commitments:
            problems.append(f"{cid!r} (opening without commitment)")
            continue
        revealed = openings[cid]
        try:
            if not isinstance(revealed, tuple) or len(revealed) != 2:
                raise ValueError("opening must be a (tensor, Opening) pair")
            ok = verify(commitments[cid], revealed[0], revealed[1], cid, round)
        except ValueError as exc:
            problems.append(f"{cid!r} (malformed: {exc})")
            continue
        if not ok:
            problems.append(f"{cid!r} (opening does not match its commitment)")
    if problems:
        raise ValueError(f"round {round}: {len(problems)} client(s) failed to open their commitments, "
                         f"nothing released: " + "; ".join(problems))
    return {cid: openings[cid][0] for cid in commitments}
