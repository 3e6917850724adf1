"""Homomorphic aggregation over the Wire: CKKS ciphertexts up, a decrypted weighted mean back.

A :class:`~toolkit.federated.wire_aggregation.WireAggregator` on :mod:`defenses.homomorphic`
(CKKS, Cheon, Kim, Kim, Song, "Homomorphic encryption for arithmetic of approximate numbers",
2017, through TenSEAL), in the shape of HE-based federated aggregation (Zhang et al., "BatchCrypt",
2020; Roth et al., "NVIDIA FLARE", 2022). Three kinds of party: the clients, ``"server"`` and
``"keyholder"``. Each round:

1. the key holder's public context (the TenSEAL context without its secret key) reaches every
   client the first time it takes part, and the server once (kind ``"he-context"``): counted once
   per party per run (one key pair per run, as a deployment provisions it), so a client's first
   round carries 0.37 MB more down;
2. each client encrypts ``[w_i * (u_i + e_i), w_i]`` (its update times its sample count, the
   count in the last slot, so the sum yields the weighted mean) and sends the ciphertext bytes as a
   uint8 tensor (kind ``"he-ciphertext"``); ``e_i ~ N(0, noise_std^2)`` per coordinate is the
   hybrid's lightweight DP noise, drawn on the client from ``uploads.generator`` (0: none);
3. the server adds the ciphertexts under the public context (it holds no secret key and cannot
   decrypt) and sends the encrypted sum to the key holder (kind ``"he-sum"``);
4. the key holder decrypts the sum only and returns the weighted mean ``sum_i w_i (u_i + e_i) /
   sum_i w_i`` to the server (kind ``"aggregate"``), float64.

The server's transcript thus holds the public context, the clients' ciphertexts and the
aggregate; the key holder's, the encrypted sum. Trust: the key holder could decrypt a single
client's ciphertext just as well, so the scheme assumes it does not collude with the server (the
server forwards sums only). The noise makes the released mean carry ``N(0, s^2)`` per coordinate,
``s = noise_std * sqrt(sum_i w_i^2) / sum_i w_i`` (``noise_std / sqrt(n)`` for equal weights;
tested); for calibrated DP, wrap this aggregation in :class:`defenses.aggregation_dp.DPAggregation`
with ``mode="distributed"`` instead.

Figures with the defaults (tested): the decrypted mean of 10 clients x 10,000 standard normal
values under sample-count weights is within ``1e-9`` of the plaintext weighted mean (max abs
error measured 1e-11 to 3e-11: CKKS's ~3e-8 absolute error on the weighted sum, divided by the
total weight); a ciphertext is 13x to 16x its float32 plaintext at 100,000 parameters (25
chunks, about 5.9 MB against 0.4 MB).

Malformed input names the client at fault: a ciphertext under another key, truncated, with
trailing bytes, a chunk SEAL refuses, or the wrong length. CKKS ciphertexts are malleable and carry
no authentication: a flipped bit inside a coefficient that stays below its prime decrypts to a
wrong sum without any error (tested); integrity in transit is the transport's job (TLS).

Randomness: the encryption randomness is SEAL's CSPRNG from the OS, on purpose (a seedable
ciphertext would not be secret), and so is the key pair; the noise comes from the caller's
generator, so the same seed gives the same aggregate up to the CKKS error.

Example:
    >>> from toolkit.federated import Uploads
    >>> from toolkit.wire import Wire
    >>> wire, he = Wire(), HomomorphicAggregation()
    >>> uploads = Uploads(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), ("a", "b"), torch.tensor([1.0, 3.0],
    ...                   dtype=torch.float64), torch.zeros(2, dtype=torch.float64), 1, torch.Generator())
    >>> out = he.over_wire(wire, uploads)
    >>> out.update.round(decimals=6).tolist(), out.included
    ([2.5, 3.5], ('a', 'b'))
    >>> sorted({t.kind for t in wire.observed(by="server")})
    ['aggregate', 'he-ciphertext', 'he-context']
"""
from __future__ import annotations

import math
import time
from typing import Any

import tenseal as ts
import torch
from torch import Tensor

from defenses.homomorphic import CKKSClient, CKKSParameters, CKKSServer, KeyHolder
from toolkit import validate
from toolkit.federated.wire_aggregation import SERVER, Aggregate, Uploads, WireAggregator
from toolkit.wire import Wire

__all__ = ["HomomorphicAggregation", "KEYHOLDER"]

KEYHOLDER = "keyholder"
SECURITY_BITS = 128  # CKKSParameters admits only SEAL's 128-bit table of coefficient modulus sizes


def _as_tensor(data: bytes) -> Tensor:
    """Bytes as the uint8 tensor that crosses the Wire."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _as_bytes(t: Tensor) -> bytes:
    """What a party received as a uint8 tensor, back to bytes (anything else is refused)."""
    if not isinstance(t, Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError(f"expected bytes as a 1-D uint8 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    return t.numpy().tobytes()


class HomomorphicAggregation(WireAggregator):
    """CKKS aggregation with a key holder, optionally with each client's Gaussian noise (see the module).

    Args:
        params: the CKKS parameters (:class:`defenses.homomorphic.CKKSParameters`; its defaults:
            degree 8192, primes (60, 40, 60), scale 2^40, 128-bit security).
        noise_std: standard deviation of the noise each client adds to each coordinate of its
            update before encrypting (>= 0; 0: none).

    Every value a client encrypts, ``w_i * (u_i + e_i)``, and the sum over the clients must stay
    below the parameters' ``max_magnitude`` (2^58 with the defaults); a client over it is refused
    by name. The key holder makes its key pair here, once for this object's runs.
    """

    name = "ckks"

    def __init__(self, params: CKKSParameters | None = None, *, noise_std: float = 0.0):
        self.params = CKKSParameters() if params is None else params
        if not isinstance(self.params, CKKSParameters):
            raise ValueError(f"params must be CKKSParameters, got {type(params).__name__}")
        self.noise_std = validate.non_negative("noise_std", noise_std)
        self._holder = KeyHolder(self.params)  # the key holder's state: it alone keeps the secret key
        self._wire: Wire | None = None  # the run whose parties hold the context
        self._server: CKKSServer | None = None  # the server's party, built from the context it received
        self._clients: dict[str, CKKSClient] = {}  # each client's party, from the context it received
        self._parties: dict[bytes, CKKSClient] = {}  # received context bytes -> loaded party (see _client)

    def public_context(self) -> bytes:
        """The key holder's public context (no secret key): what the clients and the server receive."""
        return self._holder.public_context()

    # -- the protocol --------------------------------------------------------------------------
    def over_wire(self, wire: Wire, uploads: Uploads) -> Aggregate:
        if not uploads.names:
            raise ValueError("a CKKS aggregation round needs at least one client's upload")
        w = uploads.weights.to(torch.float64)
        bad = [n for n, x in zip(uploads.names, w.tolist()) if not (x > 0 and x < float("inf"))]
        if bad:
            raise ValueError(f"clients {bad} have weights that are not finite and > 0: CKKS aggregation divides "
                             f"by the encrypted total weight")
        if self._wire is not wire:  # a new run: its parties hold no context yet
            self._wire, self._server, self._clients = wire, None, {}
        report: dict[str, Any] = {}
        down = self._distribute(wire, uploads.names)
        report["he_context_bytes"] = down

        start = time.perf_counter()
        plain = self._plaintexts(uploads)  # (M, P + 1) float64, on the clients' side
        cts = []
        for name, row in zip(uploads.names, plain):
            try:
                cts.append(self._clients[name].encrypt(row))
            except ValueError as exc:
                raise ValueError(f"client {name!r} cannot encrypt its update: {exc}") from None
        report["he_encrypt_seconds"] = (time.perf_counter() - start) / len(cts)
        up_before = wire.total_bytes
        received = [_as_bytes(wire.send(_as_tensor(ct), sender=name, receiver=SERVER, kind="he-ciphertext"))
                    for name, ct in zip(uploads.names, cts)]
        bytes_up = wire.total_bytes - up_before
        report["he_ciphertext_bytes"] = bytes_up / len(cts)

        start = time.perf_counter()
        total = self._add(received, uploads.names, plain.shape[1])
        report["he_add_seconds"] = time.perf_counter() - start
        keyholder_before = wire.total_bytes
        delivered = _as_bytes(wire.send(_as_tensor(total), sender=SERVER, receiver=KEYHOLDER, kind="he-sum"))

        start = time.perf_counter()
        mean = self._decrypt(delivered, plain.shape[1], uploads.names)
        report["he_decrypt_seconds"] = time.perf_counter() - start
        update = wire.send(mean, sender=KEYHOLDER, receiver=SERVER, kind="aggregate")
        report["he_keyholder_bytes"] = wire.total_bytes - keyholder_before
        return Aggregate(update.to(uploads.updates.dtype), uploads.names, bytes_up, down, report)

    def _distribute(self, wire: Wire, names: tuple[str, ...]) -> int:
        """The key holder's public context to the server and to the clients that do not hold it yet;
        returns the bytes sent to clients."""
        public = _as_tensor(self._holder.public_context())
        if self._server is None:
            delivered = _as_bytes(wire.send(public, sender=KEYHOLDER, receiver=SERVER, kind="he-context"))
            try:
                self._server = CKKSServer(delivered)
            except ValueError as exc:
                raise ValueError(f"the server cannot load the key holder's public context: {exc}") from None
        new = tuple(n for n in names if n not in self._clients)
        if not new:
            return 0
        before = wire.total_bytes
        delivered = _as_bytes(wire.broadcast(public, sender=KEYHOLDER, receivers=new, kind="he-context"))
        try:
            party = self._client(delivered)
        except ValueError as exc:
            raise ValueError(f"clients {list(new)} cannot load the key holder's public context: {exc}") from None
        self._clients.update(dict.fromkeys(new, party))
        return wire.total_bytes - before

    def _client(self, public: bytes) -> CKKSClient:
        """A client's party for the context bytes it received. Simulation shortcut: clients that
        received the same bytes share one loaded context (each would deserialize the same bytes; a
        SEAL context per client would take megabytes each at a thousand clients)."""
        if public not in self._parties:
            self._parties = {public: CKKSClient(public)}  # a new key pair retires the old contexts
        return self._parties[public]

    def _plaintexts(self, uploads: Uploads) -> Tensor:
        """``(M, P + 1)`` float64: each client's noised update times its weight, then its weight."""
        u = uploads.updates.to(torch.float64)
        if self.noise_std:
            u = u + self.noise_std * torch.randn(u.shape, generator=uploads.generator, dtype=torch.float64)
        w = uploads.weights.to(torch.float64)[:, None]
        return torch.cat([w * u, w], dim=1)

    def _add(self, cts: list[bytes], names: tuple[str, ...], length: int) -> bytes:
        """The server's sum of the ciphertexts; a malformed one is a ValueError naming its client."""
        assert self._server is not None
        try:
            return self._server.aggregate(cts)
        except ValueError as exc:
            blame = []
            for name, ct in zip(names, cts):
                try:
                    n, _ = self._server.load(ct)
                except ValueError as why:
                    blame.append(f"{name!r} ({why})")
                    continue
                if n != length:
                    blame.append(f"{name!r} ({n} values, expected {length}: the model's parameters and the weight)")
            if not blame:
                raise
            raise ValueError(f"the server refused the ciphertexts of clients {', '.join(blame)}; nothing was "
                             f"aggregated") from exc

    def _decrypt(self, total: bytes, length: int, names: tuple[str, ...]) -> Tensor:
        """The key holder's side: decrypt the sum, return the weighted mean ``(P,)`` float64."""
        try:
            plain = self._holder.decrypt(total)
        except ValueError as exc:
            raise ValueError(f"the key holder refused the encrypted sum: {exc}") from None
        if plain.shape != (length,):
            # the server adds ciphertexts of one length only: every client sent this wrong one
            raise ValueError(f"clients {list(names)} all sent ciphertexts of {len(plain)} values, expected {length} "
                             f"(the model's parameters and the weight); nothing was released")
        weight = float(plain[-1])
        if not weight > 0:
            raise ValueError(f"the decrypted total weight is {weight}, not > 0: the sum is corrupted")
        return plain[:-1] / weight

    # -- the record ----------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        """Scheme, library and version, CKKS parameters, security level, noise, parties, key schedule."""
        p = self.params
        return {"protocol": self.name, "version": 1, "scheme": "CKKS", "library": "TenSEAL",
                "library_version": ts.__version__, "poly_modulus_degree": p.poly_modulus_degree,
                "coeff_mod_bit_sizes": list(p.coeff_mod_bit_sizes), "global_scale": float(p.global_scale),
                "security_bits": SECURITY_BITS, "slots": p.slot_count, "noise_std": self.noise_std,
                "key_holder": KEYHOLDER, "context": "once per party per run",
                "trust": "the key holder does not collude with the server"}

    def __repr__(self) -> str:
        p = self.params
        return (f"HomomorphicAggregation(CKKS N={p.poly_modulus_degree}, primes={list(p.coeff_mod_bit_sizes)}, "
                f"scale=2^{math.log2(p.global_scale):g}, "
                f"noise_std={self.noise_std})")
