"""Secure aggregation plugged into federated averaging: the server learns the weighted mean update of
the round's surviving clients and nothing about any one of them (Bonawitz et al., "Practical secure
aggregation for privacy-preserving machine learning", CCS 2017; SecAgg+ after Bell et al., "Secure
single-server aggregation with (poly)logarithmic overhead", CCS 2020). The four rounds run over the
Wire (:mod:`defenses.secagg.protocol`), so every key, ciphertext, masked vector and share is counted
and recorded, and ``wire.observed(by="server")`` holds only what the protocol lets the server see.

Encoding of FedAvg's weighted mean (each client, on its side):

1. clip every coordinate of its update to ``[-bound, bound]`` (the clipped fraction is reported: a
   clipped update biases the mean, so choose ``bound`` to clip nothing or report it);
2. scale by ``a_u = w_u / w_max``, its sample count over the round's largest (the counts are public
   in this engine: FedAvg's server weights plain uploads by them, so one public scale is announced),
   and append the coordinate ``bound a_u``: ``z_u = (a_u x_u, bound a_u)``, every entry in
   ``[-bound, bound]``;
3. encode ``z_u`` in fixed point at scale ``2^frac`` in the ring Z_{2^bits} sized by
   :class:`~defenses.secagg.FixedPoint` for the round's n clients, so the sum of the survivors
   cannot wrap.

The server decodes the ring sum and divides the first d entries by the last over ``bound``: exactly
the survivors' weighted mean up to rounding. Each entry is off by at most ``2^-(frac+1)`` per
client, so the released mean is within ``2^-frac / mean(a_u) + O(4^-frac)`` of the plaintext
weighted mean of the clipped updates (tested), 1.5e-5 at frac = 16 with equal counts.

Example:
    >>> from toolkit import data, models
    >>> from toolkit.federated import FedConfig, FederatedAveraging
    >>> fl = FederatedAveraging(models.mlp([64, 16, 10]), data.partition(data.load("digits"), 5),
    ...                         config=FedConfig(seed=0), aggregator=SecureAggregation(threshold=3))
    >>> history = fl.fit(rounds=1)
    >>> [int(history[c].iloc[0]) for c in ("secagg_threshold", "secagg_ring_bits", "rejected")]
    [3, 21, 0]
    >>> fl.manifest()["aggregation"]["protocol"], fl.manifest()["aggregation"]["aead"]
    ('secagg', 'ChaCha20-Poly1305')
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from defenses.secagg.aead import AEAD
from defenses.secagg.encoding import FixedPoint
from defenses.secagg.keys import SEED_BYTES
from defenses.secagg.protocol import STAGES, VERSION, resolve_neighbours, resolve_threshold, secure_sum
from toolkit.federated.wire_aggregation import Aggregate, Uploads, WireAggregator
from toolkit.wire import Wire

__all__ = ["SecureAggregation", "SecAggPlus", "encode_updates"]


def encode_updates(updates: torch.Tensor, weights: torch.Tensor, fp: FixedPoint) -> tuple[torch.Tensor, float]:
    """Each client's ``z_u = (a_u clip(x_u), bound a_u)`` encoded in ``fp``'s ring (see the module
    docstring); returns ``((M, d + 1) int64, fraction of coordinates clipped)``."""
    w = weights.to(torch.float64)
    if w.dim() != 1 or len(w) != len(updates) or not bool(torch.isfinite(w).all()) or not bool((w > 0).all()):
        raise ValueError("weights must be one finite positive sample count per client")
    x = updates.detach().to(torch.float64)
    clipped = float((x.abs() > fp.bound).sum()) / max(1, x.numel())
    a = (w / w.max()).unsqueeze(1)  # (M, 1) in (0, 1]
    z = torch.cat([a * x.clamp(-fp.bound, fp.bound), fp.bound * a], dim=1)  # (M, d + 1) in [-bound, bound]
    return fp.encode(z), clipped


class SecureAggregation(WireAggregator):
    """Bonawitz et al.'s secure aggregation with dropout recovery, as a FedAvg aggregation.

    Args:
        threshold: t, an int, or a fraction of the round's clients (SecAgg) or of a neighbourhood of
            k + 1 (SecAgg+): ``t = max(2, ceil(fraction * size))``. A round in which fewer than t
            clients answer any stage releases nothing (ValueError).
        bound: every coordinate of an update is clipped to ``[-bound, bound]`` before encoding.
        frac: fixed-point fraction bits (one quantization step is ``2^-frac``).
        neighbours: None (every pair masks: SecAgg), an int k or ``"log"`` (SecAgg+ on a random
            Harary graph drawn per round from the engine's generator;
            :func:`~defenses.secagg.protocol.default_neighbours`).
        dropout: a probability that a client still present drops at each stage, or
            ``{stage: probability}`` over ``("advertise", "share", "masked", "unmask")``, drawn from
            ``uploads.generator`` (nothing is drawn for a zero probability); or a callable
            ``fn(uploads) -> {stage: names}``, an explicit schedule (a test hook).
        commitments: hash commitments to the masked inputs, opened and checked at unmasking.

    History columns (``Aggregate.report``): ``secagg_bytes_<stage>`` (bytes up and down of that
    stage), ``secagg_dropped_<stage>``, ``secagg_threshold``, ``secagg_neighbours``,
    ``secagg_ring_bits``, ``secagg_clipped`` (fraction of coordinates clipped), ``secagg_unopened``,
    ``secagg_client_seconds`` (the clients' protocol computation, summed over clients; their local
    training excluded) and ``secagg_server_seconds`` (the server's).
    """

    name = "secagg"

    def __init__(self, *, threshold: int | float = 0.5, bound: float = 1.0, frac: int = 16, neighbours=None,
                 dropout: float | Mapping[str, float] | Callable[[Uploads], Mapping[str, Any]] = 0.0,
                 commitments: bool = True):
        # the type and range of threshold, before any round (its size is the round's, see resolve_threshold)
        resolve_threshold(threshold, threshold if type(threshold) is int and threshold >= 2 else 2)
        FixedPoint(n_clients=2, bound=bound, frac=frac)  # validates bound and frac
        resolve_neighbours(neighbours, 3)
        if not isinstance(commitments, bool):
            raise ValueError(f"commitments must be a bool, got {commitments!r}")
        self.threshold, self.bound, self.frac = threshold, float(bound), frac
        self.neighbours, self.commitments = neighbours, commitments
        self.dropout = self._check_dropout(dropout)
        self.protocol = "secagg" if neighbours is None else "secagg+"
        self._last: dict[str, Any] = {}

    @staticmethod
    def _check_dropout(dropout):
        if callable(dropout):
            return dropout
        probs = dict.fromkeys(STAGES, dropout) if not isinstance(dropout, Mapping) else dict(dropout)
        unknown = sorted(set(probs) - set(STAGES))
        if unknown:
            raise ValueError(f"dropout stages must be among {STAGES}, got {unknown}")
        for stage, p in probs.items():
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
                raise ValueError(f"the dropout probability at {stage!r} must be in [0, 1), got {p!r}")
        return {s: float(probs.get(s, 0.0)) for s in STAGES}

    def schedule(self, uploads: Uploads) -> dict[str, tuple[str, ...]]:
        """Who drops at which stage this round: the explicit schedule, or draws from ``uploads.generator``
        (stage by stage, among the clients still present; none for a zero probability)."""
        if callable(self.dropout):
            return {s: tuple(v) for s, v in dict(self.dropout(uploads)).items()}
        present, out = list(uploads.names), {}
        for stage in STAGES:
            p = self.dropout[stage]
            if p == 0 or not present:
                out[stage] = ()
                continue
            drop = (torch.rand(len(present), generator=uploads.generator) < p).tolist()
            out[stage] = tuple(n for n, d in zip(present, drop) if d)
            present = [n for n, d in zip(present, drop) if not d]
        return out

    def over_wire(self, wire: Wire, uploads: Uploads) -> Aggregate:
        """One secure-aggregation round for ``uploads``; the weighted mean of the round-2 survivors."""
        n, d = uploads.updates.shape
        if n < 2:
            raise ValueError(f"round {uploads.round}: secure aggregation needs at least 2 clients, got {n} "
                             f"({list(uploads.names)}): a single client's sum is its update")
        fp = FixedPoint(n_clients=n, bound=self.bound, frac=self.frac)
        encoded, clipped = encode_updates(uploads.updates, uploads.weights, fp)
        out = secure_sum(wire, encoded, uploads.names, threshold=self.threshold, bits=fp.bits, round=uploads.round,
                         neighbours=self.neighbours, dropouts=self.schedule(uploads), generator=uploads.generator,
                         commitments=self.commitments)
        total = fp.decode(out.total)  # (d + 1,) float64
        update = (total[:d] * (self.bound / total[d])).to(uploads.updates.dtype)
        report: dict[str, Any] = {f"secagg_bytes_{s}": out.bytes_up[s] + out.bytes_down[s] for s in STAGES}
        report.update({f"secagg_dropped_{s}": len(out.dropped[s]) for s in STAGES})
        report.update(secagg_threshold=out.threshold, secagg_neighbours=out.neighbours, secagg_ring_bits=out.bits,
                      secagg_clipped=clipped, secagg_unopened=out.unopened,
                      secagg_client_seconds=out.client_seconds, secagg_server_seconds=out.server_seconds)
        self._last = {"ring_bits": out.bits, "t": out.threshold, "k": out.neighbours}
        return Aggregate(update, out.included, sum(out.bytes_up.values()), sum(out.bytes_down.values()), report)

    def manifest(self) -> dict[str, Any]:
        """The auditable record: protocol, version and every cryptographic parameter."""
        return {"protocol": self.protocol, "version": VERSION, "curve": "X25519", "kdf": "HKDF-SHA256",
                "mask_prg": "ChaCha20", "aead": AEAD, "commitment": "SHA-256" if self.commitments else None,
                "secret_sharing": "Shamir over GF(2^127 - 1)", "ring_bits": self._last.get("ring_bits"),
                "frac": self.frac, "bound": self.bound, "threshold": self.threshold,
                "threshold_t": self._last.get("t"), "neighbours": self.neighbours,
                "neighbours_k": self._last.get("k"), "seed_bits": 8 * SEED_BYTES,
                "dropout": "schedule" if callable(self.dropout) else dict(self.dropout)}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(threshold={self.threshold}, bound={self.bound}, frac={self.frac}, "
                f"neighbours={self.neighbours!r}, commitments={self.commitments})")


class SecAggPlus(SecureAggregation):
    """SecAgg+ (Bell et al., 2020): :class:`SecureAggregation` with ``neighbours="log"``, each client
    masking and sharing with ``2 ceil(log2 n)`` neighbours of a random graph drawn per round (an int
    ``neighbours`` overrides the default)."""

    def __init__(self, **kw: Any):
        kw.setdefault("neighbours", "log")
        if kw["neighbours"] is None:
            raise ValueError("SecAggPlus needs neighbours ('log' or an int k); use SecureAggregation for every pair")
        super().__init__(**kw)

