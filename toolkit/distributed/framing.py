"""The message frame: a fixed int64 header (plain metadata) followed by the payload bytes.

A frame is one fixed-size message of ``FIRST_BYTES`` (the header, then the first ``INLINE``
payload bytes, zero padded), and, for a longer payload, a second message with the rest: a small
tensor costs one gloo round of latency instead of two.

Only tensors cross: the header is an int64 tensor of ``HEADER_LEN`` entries, the payload a flat
uint8 tensor (the tensor's bytes, or nonce-free ciphertext plus tag when encrypted). Nothing is
pickled or ``torch.load``-ed on either side; the receiver rebuilds the tensor from the dtype code
and shape in the header, checked against what it expects.

Header layout (int64 entries):
    0 magic, 1 cipher code (0 plain), 2 sequence number (per sender -> receiver pair),
    3 src rank, 4 dst rank, 5 dtype code, 6 ndim, 7 payload bytes on the wire,
    8..15 shape (up to ``MAX_DIMS`` dims), 16..23 kind (UTF-8, up to ``MAX_KIND`` bytes, zero padded).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

MAGIC = 0x4C4B4C4231  # "LKLB1"
HEADER_LEN = 24
HEADER_BYTES = 8 * HEADER_LEN
FIRST_BYTES = 4096  # the first message of a frame: the header, then up to INLINE payload bytes
INLINE = FIRST_BYTES - HEADER_BYTES  # a payload this small travels in one message; the rest in a second
MAX_DIMS = 8
MAX_KIND = 64
TAG_BYTES = 16  # AEAD authentication tag appended to the ciphertext
CIPHER_CODES = {None: 0, "aes-gcm": 1, "chacha20-poly1305": 2}

DTYPES: dict[int, torch.dtype] = {
    1: torch.float32, 2: torch.float64, 3: torch.float16, 4: torch.bfloat16, 5: torch.uint8,
    6: torch.int8, 7: torch.int16, 8: torch.int32, 9: torch.int64, 10: torch.bool,
    11: torch.complex64, 12: torch.complex128,
}
CODES = {dtype: code for code, dtype in DTYPES.items()}


def encode_kind(kind: str) -> list[int]:
    """``kind`` as 8 int64 words (UTF-8 bytes, zero padded); a ValueError if it is too long."""
    if not isinstance(kind, str):
        raise TypeError(f"kind must be a str, got {type(kind).__name__}")
    raw = kind.encode("utf-8")
    if len(raw) > MAX_KIND or b"\x00" in raw:
        raise ValueError(f"kind {kind!r} must be at most {MAX_KIND} UTF-8 bytes with no NUL, got {len(raw)} bytes")
    raw = raw.ljust(MAX_KIND, b"\x00")
    return [int.from_bytes(raw[i:i + 8], "little", signed=True) for i in range(0, MAX_KIND, 8)]


def decode_kind(words: list[int]) -> str:
    raw = b"".join(int(w).to_bytes(8, "little", signed=True) for w in words)
    return raw.rstrip(b"\x00").decode("utf-8", errors="replace")


def make_header(tensor: Tensor, *, cipher: int, seq: int, src: int, dst: int, kind: str) -> Tensor:
    """The int64 header describing ``tensor`` (its payload size includes the tag when encrypted)."""
    if tensor.dtype not in CODES:
        raise TypeError(f"cannot send dtype {tensor.dtype}; supported: {sorted(str(d) for d in CODES)}")
    if tensor.dim() > MAX_DIMS:
        raise ValueError(f"cannot send a tensor with {tensor.dim()} dims (at most {MAX_DIMS})")
    shape = list(tensor.shape) + [0] * (MAX_DIMS - tensor.dim())
    nbytes = tensor.nbytes + (TAG_BYTES if cipher else 0)
    words = [MAGIC, cipher, seq, src, dst, CODES[tensor.dtype], tensor.dim(), nbytes, *shape, *encode_kind(kind)]
    return torch.tensor(words, dtype=torch.int64)


class Header:
    """A received header, parsed and sanity-checked (bad frames raise ValueError naming the sender)."""

    def __init__(self, words: Tensor, *, src: int):
        w = words.tolist()
        if w[0] != MAGIC:
            raise ValueError(f"message from rank {src} is not a LeakLab frame (bad magic {w[0]:#x})")
        self.words = words
        self.cipher, self.seq, self.src, self.dst = w[1], w[2], w[3], w[4]
        if w[5] not in DTYPES:
            raise ValueError(f"message from rank {src} has an unknown dtype code {w[5]}")
        self.dtype = DTYPES[w[5]]
        ndim = w[6]
        if not 0 <= ndim <= MAX_DIMS or any(s < 0 for s in w[8:8 + ndim]):
            raise ValueError(f"message from rank {src} has a malformed shape header {w[6:16]}")
        self.shape = tuple(w[8:8 + ndim])
        self.nbytes = w[7]
        self.kind = decode_kind(w[16:24])
        plain = math.prod(self.shape) * self.dtype.itemsize
        if self.nbytes != plain + (TAG_BYTES if self.cipher else 0):
            raise ValueError(f"message from rank {src}: payload of {self.nbytes} bytes does not fit shape "
                             f"{self.shape} {self.dtype}")

    @property
    def plain_nbytes(self) -> int:
        return self.nbytes - (TAG_BYTES if self.cipher else 0)

    def aad(self, *, src: int, dst: int, seq: int) -> bytes:
        """Associated data for the AEAD: the header with the *expected* sender, receiver and
        sequence number in place, so a replayed, redirected or relabelled frame fails authentication."""
        w = self.words.clone()
        w[2], w[3], w[4] = seq, src, dst
        return w.numpy().tobytes()


def as_bytes(tensor: Tensor) -> Tensor:
    """A flat uint8 view of ``tensor``'s bytes (contiguous copy only when needed)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


def from_bytes(raw: Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    """Rebuild a tensor of ``dtype`` and ``shape`` from a flat uint8 tensor (no copy)."""
    if dtype == torch.uint8:
        return raw.reshape(shape)
    if raw.numel() == 0:
        return torch.empty(shape, dtype=dtype)
    return raw.view(dtype).reshape(shape)
