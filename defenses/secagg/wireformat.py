"""The byte layouts of secure aggregation's messages (Bonawitz et al., CCS 2017, the four rounds of
:mod:`defenses.secagg.protocol`): every message is a ``uint8`` tensor, rows of fixed width per
kind, so a round's messages stack into one Wire send. Nothing is unpickled; every field is parsed
with :mod:`struct` and checked.

Layouts (ids are a client's position in the round's list of names, big-endian ``uint16``):

- ``KEYS`` (client to server, 64 bytes): the encryption public key ``c_pk`` and the masking public key
  ``s_pk``, 32 raw X25519 bytes each;
- ``KEY_LIST`` (server to clients, 66 bytes a row): ``id || c_pk || s_pk``;
- ``SHARES`` (client to client through the server, 144 bytes): ``from || to`` in the clear (the server
  routes by them) then the sealed ``from || to || share of s_SK (54) || share of b (54)``;
- masked input: the ``d`` ring elements bit-packed, ``bits`` bits each, ``ceil(d bits / 8)`` bytes
  (what a ring of ``2^bits`` costs: the accounting of Bonawitz et al.'s expansion figures);
- ``REQUEST`` (server to clients, 3 bytes): ``id || status`` with status 1 (survived the masked-input
  round: send the share of its self-mask seed b) or 0 (dropped: send the share of its key s_SK);
- ``UNMASK`` (client to server, 57 bytes): ``owner id || status || share (54)``;
- commitments, seed hashes and openings: 32 bytes.

Example:
    >>> import torch
    >>> y = torch.tensor([0, 5, 2**20 - 1, 77])
    >>> packed = pack_ring(y, bits=20)
    >>> packed.dtype, packed.numel()  # 4 * 20 bits = 10 bytes
    (torch.uint8, 10)
    >>> unpack_ring(packed, 4, 20).tolist()
    [0, 5, 1048575, 77]
"""
from __future__ import annotations

import struct

import numpy as np
import torch
from torch import Tensor

from defenses.secagg.aead import OVERHEAD
from defenses.secagg.encoding import check_bits
from defenses.secagg.keys import PUBLIC_KEY_BYTES

SHARE_BYTES = 6 + 3 * 16  # Share.to_bytes of a 32-byte secret: header, three field elements
DIGEST_BYTES = 32
KEYS = 2 * PUBLIC_KEY_BYTES
KEY_LIST = 2 + KEYS
PLAIN_SHARES = 4 + 2 * SHARE_BYTES
SHARES = 4 + OVERHEAD + PLAIN_SHARES
REQUEST = 3
UNMASK = 3 + SHARE_BYTES
MAX_CLIENTS = 65535
_IDS = struct.Struct(">HH")
_ID = struct.Struct(">H")

__all__ = ["SHARE_BYTES", "DIGEST_BYTES", "KEYS", "KEY_LIST", "PLAIN_SHARES", "SHARES", "REQUEST", "UNMASK",
           "to_tensor", "to_bytes", "rows", "check_rows", "pack_ring", "unpack_ring", "packed_bytes", "pack_ids", "unpack_ids",
           "pack_id", "unpack_id"]


def to_tensor(data: bytes) -> Tensor:
    """A ``uint8`` tensor of ``data`` (a copy)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def to_bytes(t: Tensor) -> bytes:
    """The bytes of a ``uint8`` tensor."""
    return t.detach().contiguous().numpy().tobytes()


def rows(data: list[bytes], width: int) -> Tensor:
    """``(len(data), width)`` uint8 tensor of byte rows of equal ``width``."""
    if any(len(r) != width for r in data):
        raise ValueError(f"message rows must all be {width} bytes")
    return to_tensor(b"".join(data)).reshape(len(data), width)


def check_rows(t, width: int, what: str) -> Tensor:
    """``t`` as ``(R, width)`` uint8 rows, or a ValueError naming ``what``."""
    if not isinstance(t, Tensor) or t.dtype != torch.uint8:
        raise ValueError(f"{what}: expected a uint8 tensor, got "
                         f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    if t.dim() == 1 and t.numel() == width:
        t = t.reshape(1, width)
    if t.numel() == 0 and t.dim() <= 2:  # nobody sent: the round's count check speaks
        t = t.reshape(0, width)
    if t.dim() != 2 or t.shape[1] != width:
        raise ValueError(f"{what}: expected rows of {width} bytes, got shape {tuple(t.shape)}")
    return t


def packed_bytes(d: int, bits: int) -> int:
    """Bytes of ``d`` bit-packed ring elements of ``bits`` bits."""
    return -(-d * check_bits(bits) // 8)


def pack_ring(values: Tensor, bits: int) -> Tensor:
    """Bit-pack a 1-D int64 tensor of ring elements in ``[0, 2^bits)``: ``bits`` bits each, little-endian."""
    bits = check_bits(bits)
    if not isinstance(values, Tensor) or values.dtype != torch.int64 or values.dim() != 1:
        raise ValueError("pack_ring expects a 1-D int64 tensor of ring elements")
    if ((values < 0) | (values >= (1 << bits))).any():
        raise ValueError(f"pack_ring: values outside the ring [0, 2^{bits})")
    raw = values.contiguous().numpy().view(np.uint8).reshape(-1, 8)  # little-endian int64 bytes
    bitmat = np.unpackbits(raw, axis=1, bitorder="little")[:, :bits]  # (d, bits), low bit first
    return torch.from_numpy(np.packbits(bitmat.reshape(-1), bitorder="little"))


def unpack_ring(packed: Tensor, d: int, bits: int) -> Tensor:
    """The ``d`` int64 ring elements of :func:`pack_ring`'s output; refuses a wrong length."""
    bits = check_bits(bits)
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("unpack_ring expects a 1-D uint8 tensor")
    if packed.numel() != packed_bytes(d, bits):
        raise ValueError(f"a masked vector of {d} elements of {bits} bits is {packed_bytes(d, bits)} bytes, "
                         f"got {packed.numel()}")
    bitmat = np.unpackbits(packed.contiguous().numpy(), count=d * bits, bitorder="little").reshape(d, bits)
    full = np.zeros((d, 64), dtype=np.uint8)
    full[:, :bits] = bitmat
    return torch.from_numpy(np.packbits(full, axis=1, bitorder="little").view("<i8").reshape(d).copy())


def pack_id(i: int) -> bytes:
    return _ID.pack(i)


def unpack_id(data: bytes) -> int:
    return _ID.unpack_from(data)[0]


def pack_ids(a: int, b: int) -> bytes:
    return _IDS.pack(a, b)


def unpack_ids(data: bytes) -> tuple[int, int]:
    return _IDS.unpack_from(data)
