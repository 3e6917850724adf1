"""Homomorphic aggregation with CKKS (TenSEAL): clients encrypt, the server adds, the key holder decrypts.

CKKS (Cheon, Kim, Kim, Song, "Homomorphic encryption for arithmetic of approximate numbers", 2017)
encrypts a vector of reals into one ciphertext of ``poly_modulus_degree / 2`` slots; adding two
ciphertexts adds the vectors slot-wise, with no key. Here, as in HE-based federated aggregation
(e.g. Zhang et al., "BatchCrypt", 2020; Roth et al., "NVIDIA FLARE", 2022):

- a :class:`KeyHolder` makes the TenSEAL context and keeps its secret key; it hands out
  :meth:`KeyHolder.public_context`, the context serialized with the secret key dropped
  (``context.serialize(save_secret_key=False)``; relinearization and rotation keys too, since
  adding needs neither);
- a :class:`CKKSClient` encrypts its float vector, chunked into ciphertexts of the slot count,
  optionally after adding Gaussian noise of its own (the hybrid "HE + lightweight DP noise":
  with ``n`` clients each adding ``N(0, sigma^2)``, the decrypted sum carries ``N(0, n sigma^2)``,
  i.e. std ``sqrt(n) * sigma``; the caller's ``torch.Generator`` draws it);
- a :class:`CKKSServer` adds the clients' ciphertexts under the public context: it cannot decrypt
  (:func:`decrypt` with a context without the secret key is a ``ValueError``);
- the key holder decrypts the sum only. It could decrypt a single client's ciphertext just as
  well: the trust model is that the server forwards sums only and does not collude with it.

Ciphertexts travel as ``bytes``: a small header (magic, context fingerprint, length, chunk sizes,
packed with ``struct``) followed by TenSEAL's own serialization of each chunk; no pickle. The
fingerprint (SHA-256 of the public context) makes a ciphertext under another key a clear error.
With the defaults a ciphertext is about 15x its float32 plaintext (100,000 values: 25 chunks,
5.9 MB against 0.4 MB; tested between 13x and 16x).

Precision: CKKS is approximate. With the defaults, 10 clients x 10,000 values drawn from N(0, 1)
decrypt to their plaintext sum with a max abs error below ``1e-6`` (measured 2e-8 to 4e-8; tested).
Magnitudes: nothing is rescaled, so a value times the scale must fit the data primes' modulus
(all primes but the last, 100 bits with the defaults); every value and every sum must stay below
:attr:`CKKSParameters.max_magnitude` (2^58 with the defaults, half the wrap-around point). A client
refuses larger values (``ValueError``); the sum of ``n`` clients is safe when each stays below
``max_magnitude / n`` (a wrapped sum cannot be told from a right one after decryption).

Seeds: the encryption randomness is SEAL's own CSPRNG on purpose (a seedable ciphertext would not
be secret); the caller's generator draws only the DP noise, so the same seed gives the same
decrypted sum up to the CKKS error.

Example:
    >>> holder = KeyHolder()
    >>> public = holder.public_context()
    >>> clients = [CKKSClient(public) for _ in range(3)]
    >>> cts = [c.encrypt(torch.full((5,), float(i))) for i, c in enumerate(clients)]
    >>> total = CKKSServer(public).aggregate(cts)
    >>> holder.decrypt(total).round(decimals=4).tolist()
    [3.0, 3.0, 3.0, 3.0, 3.0]
"""
from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tenseal as ts
import torch

_MAGIC = b"LLCKKS1\x00"
_HEADER = struct.Struct(">8s16sQI")  # magic, context fingerprint, vector length, number of chunks
_CHUNK = struct.Struct(">Q")  # byte length of one serialized chunk
# SEAL's largest total coefficient modulus (bits) for 128-bit security, per polynomial degree.
_MAX_COEFF_BITS = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


@dataclass(frozen=True)
class CKKSParameters:
    """CKKS encryption parameters, validated on construction (bad values are a ``ValueError``)."""

    # Ring dimension N: N / 2 = 4096 slots per ciphertext, and room for 218 bits of coefficient
    # modulus at 128-bit security (SEAL's table); 8192 is the smallest degree that fits the chain below.
    poly_modulus_degree: int = 8192
    # Prime sizes (bits) of the modulus chain: all but the last form the data modulus (60 + 40 =
    # 100 bits) that a value times the scale must fit (hence max_magnitude = 2^58); the middle
    # prime matches the scale as CKKS's rescaling expects; the last (60) is SEAL's special prime
    # for key switching. Aggregation only adds (no multiplication, no rescaling), so one middle
    # prime suffices; each extra one would add half again to the ciphertext bytes.
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 60)
    # Fixed-point scale Delta: 40 fractional bits, so about 1e-8 absolute precision per slot
    # (measured 2e-8 to 4e-8 on sums of 10 standard normal vectors).
    global_scale: float = 2.0 ** 40

    def __post_init__(self) -> None:
        deg = self.poly_modulus_degree
        if isinstance(deg, bool) or not isinstance(deg, int) or deg not in _MAX_COEFF_BITS:
            raise ValueError(f"poly_modulus_degree must be one of {sorted(_MAX_COEFF_BITS)}, got {deg!r}")
        bits = tuple(self.coeff_mod_bit_sizes)
        if len(bits) < 2 or not all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 60 for b in bits):
            raise ValueError(f"coeff_mod_bit_sizes must be >= 2 integers in [1, 60], got {self.coeff_mod_bit_sizes!r}")
        if sum(bits) > _MAX_COEFF_BITS[deg]:
            raise ValueError(f"coeff_mod_bit_sizes sum to {sum(bits)} bits, more than the {_MAX_COEFF_BITS[deg]} "
                             f"allowed at poly_modulus_degree {deg} for 128-bit security")
        object.__setattr__(self, "coeff_mod_bit_sizes", bits)
        scale = self.global_scale
        if (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
                or scale <= 1.0):
            raise ValueError(f"global_scale must be a finite number > 1, got {scale!r}")
        if math.log2(scale) >= bits[0]:
            raise ValueError(f"global_scale 2^{math.log2(scale):.1f} leaves no integer bits under the first "
                             f"coefficient prime ({bits[0]} bits): lower global_scale or raise coeff_mod_bit_sizes[0]")

    @property
    def max_magnitude(self) -> float:
        """Largest safe ``|value|`` and ``|sum|``: ``2 ** (sum(data prime bits) - log2(scale) - 2)``."""
        return 2.0 ** (sum(self.coeff_mod_bit_sizes[:-1]) - math.log2(self.global_scale) - 2)

    @property
    def slot_count(self) -> int:
        """Values per ciphertext: ``poly_modulus_degree / 2``."""
        return self.poly_modulus_degree // 2


def _fingerprint(public: bytes) -> bytes:
    return hashlib.sha256(public).digest()[:16]


def _load_public(public: bytes) -> tuple[ts.Context, bytes]:
    if not isinstance(public, (bytes, bytearray)):
        raise ValueError(f"public context must be bytes from KeyHolder.public_context(), got {type(public).__name__}")
    try:
        context = ts.context_from(bytes(public))
    except Exception as exc:  # TenSEAL raises its own types on garbage
        raise ValueError(f"public context does not deserialize as a TenSEAL context: {exc}") from exc
    if context.has_secret_key():
        raise ValueError("public context holds a secret key: serialize it with save_secret_key=False")
    return context, _fingerprint(bytes(public))


def _as_vector(values, name: str = "vector") -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D float vector (flatten first), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} has non-finite values (NaN or inf)")
    return arr


def _pack(fingerprint: bytes, length: int, chunks: Sequence[ts.CKKSVector]) -> bytes:
    blobs = [c.serialize() for c in chunks]
    parts = [_HEADER.pack(_MAGIC, fingerprint, length, len(blobs))]
    for blob in blobs:
        parts += [_CHUNK.pack(len(blob)), blob]
    return b"".join(parts)


def _frame(data: bytes, fingerprint: bytes, slots: int) -> tuple[int, list[bytes]]:
    """Check a ciphertext's header and framing (no decoding): ``(length, serialized chunks)``."""
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"ciphertext must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _HEADER.size or data[:8] != _MAGIC:
        raise ValueError("ciphertext is not a LeakLab CKKS ciphertext (bad header)")
    _, fp, length, count = _HEADER.unpack_from(data)
    if fp != fingerprint:
        raise ValueError("ciphertext was encrypted under another context (key fingerprint differs)")
    if count != math.ceil(length / slots) or length == 0:
        raise ValueError(f"ciphertext header is inconsistent: {length} values in {count} chunks of {slots} slots")
    blobs, pos = [], _HEADER.size
    for _ in range(count):
        if pos + _CHUNK.size > len(data):
            raise ValueError("ciphertext is truncated")
        (size,) = _CHUNK.unpack_from(data, pos)
        pos += _CHUNK.size
        if pos + size > len(data):
            raise ValueError("ciphertext is truncated")
        blobs.append(data[pos:pos + size])
        pos += size
    if pos != len(data):
        raise ValueError(f"ciphertext has {len(data) - pos} trailing bytes")
    return length, blobs


def _decode(blobs: Sequence[bytes], context: ts.Context) -> list[ts.CKKSVector]:
    try:
        return [ts.ckks_vector_from(context, blob) for blob in blobs]
    except Exception as exc:  # TenSEAL raises its own types on garbage
        raise ValueError(f"ciphertext chunk does not deserialize: {exc}") from exc


def _unpack(data: bytes, context: ts.Context, fingerprint: bytes, slots: int) -> tuple[int, list[ts.CKKSVector]]:
    length, blobs = _frame(data, fingerprint, slots)
    return length, _decode(blobs, context)


def decrypt(chunks: Sequence[ts.CKKSVector], context: ts.Context, length: int) -> torch.Tensor:
    """Decrypt ``chunks`` with ``context``'s secret key into a float64 tensor of ``length`` values.

    A context without the secret key (a client's or the server's) is a ``ValueError``.
    """
    if not context.has_secret_key():
        raise ValueError("this context holds no secret key: only the key holder can decrypt")
    values = np.concatenate([np.asarray(c.decrypt(context.secret_key()), dtype=np.float64) for c in chunks])
    return torch.from_numpy(values[:length].copy())


class KeyHolder:
    """Makes the CKKS context, keeps the secret key, and decrypts aggregated ciphertexts."""

    def __init__(self, params: CKKSParameters | None = None):
        self.params = params if params is not None else CKKSParameters()
        if not isinstance(self.params, CKKSParameters):
            raise ValueError(f"params must be CKKSParameters, got {type(self.params).__name__}")
        self._context = ts.context(ts.SCHEME_TYPE.CKKS, self.params.poly_modulus_degree,
                                   coeff_mod_bit_sizes=list(self.params.coeff_mod_bit_sizes))
        self._context.global_scale = self.params.global_scale
        # Addition needs neither relinearization nor rotation keys: the public context carries the
        # public key only (measured: 0.36 MB instead of 1.09 MB with the relinearization keys).
        self._public = self._context.serialize(save_secret_key=False, save_relin_keys=False,
                                               save_galois_keys=False)
        self._fingerprint = _fingerprint(self._public)

    def public_context(self) -> bytes:
        """The context as bytes, secret key dropped: what clients and the server receive."""
        return self._public

    def decrypt(self, ciphertext: bytes) -> torch.Tensor:
        """Decrypt a (summed) ciphertext from :meth:`CKKSServer.aggregate` into a float64 tensor."""
        length, chunks = _unpack(ciphertext, self._context, self._fingerprint, self.params.slot_count)
        return decrypt(chunks, self._context, length)


class _PublicParty:
    """A party holding only the public context (checked: no secret key): a client or the server."""

    def __init__(self, public: bytes):
        self.context, self.fingerprint = _load_public(public)
        data = self.context.seal_context().data
        self.slot_count = data.key_context_data().parms().poly_modulus_degree() // 2
        data_bits = data.first_context_data().total_coeff_modulus_bit_count()  # all primes but the special one
        self.max_magnitude = 2.0 ** (data_bits - math.log2(self.context.global_scale) - 2)

    def load(self, ciphertext: bytes) -> tuple[int, list[ts.CKKSVector]]:
        """Deserialize ``ciphertext`` under this party's public context (checked: header and key)."""
        return _unpack(ciphertext, self.context, self.fingerprint, self.slot_count)


class CKKSClient(_PublicParty):
    """Encrypts a client's float vector under the public context, optionally noised first."""

    def encrypt(self, vector, noise_std: float = 0.0, generator: torch.Generator | None = None) -> bytes:
        """Encrypt a 1-D float vector, in chunks of the slot count, to bytes.

        With ``noise_std > 0``, Gaussian noise ``N(0, noise_std^2)`` drawn from ``generator``
        (required then) is added to every value before encryption.
        """
        arr = _as_vector(vector)
        if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or not math.isfinite(noise_std) \
                or noise_std < 0:
            raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
        if noise_std > 0:
            if not isinstance(generator, torch.Generator):
                raise ValueError("noise_std > 0 needs a torch.Generator (generator=) for the noise")
            noise = torch.randn(arr.size, generator=generator, dtype=torch.float64).numpy()
            arr = arr + noise_std * noise
        peak = float(np.abs(arr).max())
        if peak >= self.max_magnitude:
            raise ValueError(f"vector has |value| {peak:.3g} >= max_magnitude {self.max_magnitude:.3g} of these "
                             f"CKKS parameters: scale the values down or use more coefficient modulus bits")
        n = self.slot_count
        chunks = [ts.ckks_vector(self.context, arr[i:i + n].tolist()) for i in range(0, arr.size, n)]
        return _pack(self.fingerprint, arr.size, chunks)


class CKKSServer(_PublicParty):
    """Adds clients' ciphertexts under the public context; holds no secret key, so it cannot decrypt."""

    def aggregate(self, ciphertexts: Sequence[bytes]) -> bytes:
        """Sum of the ciphertexts (each from :meth:`CKKSClient.encrypt`), as bytes for the key holder."""
        if isinstance(ciphertexts, (bytes, bytearray)) or not (ciphertexts := list(ciphertexts)):
            raise ValueError("aggregate needs a non-empty sequence of ciphertexts (bytes)")
        framed = []
        for i, ct in enumerate(ciphertexts):  # every header checked before any work is done
            try:
                framed.append(_frame(ct, self.fingerprint, self.slot_count))
            except ValueError as exc:
                raise ValueError(f"ciphertext {i}: {exc}") from exc
        length = framed[0][0]
        bad = [i for i, (n, _) in enumerate(framed) if n != length]
        if bad:
            raise ValueError(f"ciphertexts {bad} have a different length than ciphertext 0 ({length} values)")
        total = _decode(framed[0][1], self.context)
        for _, blobs in framed[1:]:  # one client's ciphertext decoded at a time
            for acc, chunk in zip(total, _decode(blobs, self.context)):
                acc.add_(chunk)
        return _pack(self.fingerprint, length, total)
