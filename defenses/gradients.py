"""Gradient defenses on what a client sends: Gaussian noise, magnitude pruning, quantization.

The defenses that "Deep leakage from gradients" (Zhu, Liu, Han, NeurIPS 2019, sec. 5) tests against
its attack, as Wire transforms ``t(tensor, *, kind)`` acting on federated updates (kind
``"update"``: stacked ``(K, P)`` rows, one per client) and on split-learning cut-layer gradients
(kind ``"gradients"``: ``(B, ...)``, one row per sample); other kinds pass unchanged. Each acts
row by row (a 1-D tensor is one row), inside the sender's autograd graph: noise adds a constant
(gradient: identity), pruning multiplies by its mask (gradient: the mask, exact), quantization is
straight-through (:func:`toolkit.wire.straight_through`: the rounding's gradient is taken as the
identity). Behind a compressor (``FederatedAveraging(compressor=TopK(...))``) the update crosses
as a :class:`~toolkit.federated.packets.SparsePacket`; the transforms then act on its kept values.

Pruning is :class:`~toolkit.federated.compression.TopK` without error feedback, and stochastic
quantization is :class:`~toolkit.federated.compression.QSGD` decoded at once: both are that code.
Deterministic uniform quantization (max-scaled rounding, INT8 at 127 levels as in the DLG paper)
is written here: it is one line, and no installed library applies it to a tensor in a graph.

Each transform also says what an attacker who knows it can infer (``preimage``: the interval in
which every true entry lies, given what crossed); :class:`attacks.gradient_inversion.GradientInversion`
takes the defense as ``defense=`` and matches within those intervals.

Example:
    >>> from toolkit.wire import Wire
    >>> wire = Wire(transforms=[GradientPruning(0.5)])
    >>> wire.send(torch.tensor([[1.0, -4.0, 2.0, 0.5]]), sender=("client:0",), receiver="server", kind="update")
    tensor([[ 0., -4.,  2.,  0.]])
    >>> GradientPruning(0.5).preimage(torch.tensor([0.0, -4.0, 2.0, 0.0]))  # pruned entries were below |2|
    (tensor([-2., -4.,  2., -2.]), tensor([ 2., -4.,  2.,  2.]))
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from defenses.activations import GaussianNoise
from defenses.transforms import KindTransform
from toolkit import validate
from toolkit.federated.compression import QSGD, TopK
from toolkit.wire import straight_through

__all__ = ["GradientNoise", "GradientPruning", "GradientQuantization", "GRADIENT_DEFENSES"]

KINDS = ("update", "gradients")


class _RowTransform(KindTransform):
    """Applies ``self._rows(v (K, P)) -> (K, P)`` row by row (a 1-D tensor is one row: an update, or the values of a top-k SparsePacket)."""

    on_sparse_values = True

    def apply(self, t: Tensor) -> Tensor:
        if t.numel() == 0:
            return t
        rows = t.reshape(1, -1) if t.dim() <= 1 else t.reshape(len(t), -1)  # (K, P)
        return self._rows(rows).reshape(t.shape)

    def _rows(self, v: Tensor) -> Tensor:
        raise NotImplementedError  # pragma: no cover  (every transform defines it)


class GradientNoise(GaussianNoise):
    """Additive Gaussian noise ``N(0, variance)`` on every entry (Zhu et al., 2019, sec. 5: variances
    1e-4 to 1e-1 on the gradient). Give ``variance`` or ``sigma`` (its square root). It is
    :class:`~defenses.activations.GaussianNoise` on update and gradient kinds, top-k compressed
    updates included.

    On kind ``"update"`` it perturbs what the client sends, the weight delta ``-lr * gradient`` after
    one local step: variance ``v`` on the update is variance ``v / lr**2`` on the gradient.

    Args:
        variance: noise variance, >= 0 (0 adds nothing); or ``sigma``, the standard deviation.
        generator: every draw comes from it (torch's global RNG when None).
        kinds: the transfer kinds it perturbs.

    Example:
        >>> noise = GradientNoise(variance=1e-2, generator=torch.Generator().manual_seed(0))
        >>> out = noise(torch.zeros(2, 10_000), kind="update")
        >>> round(float(out.var()), 3), noise(torch.ones(3), kind="weights").tolist()
        (0.01, [1.0, 1.0, 1.0])
    """

    on_sparse_values = True

    def __init__(self, variance: float | None = None, *, sigma: float | None = None,
                 generator: torch.Generator | None = None, kinds: Sequence[str] = KINDS):
        if (variance is None) == (sigma is None):
            raise ValueError(f"give the noise as variance= or as sigma=, exactly one; got variance={variance!r}, "
                             f"sigma={sigma!r}")
        self.sigma = validate.non_negative("sigma", sigma) if sigma is not None else \
            validate.non_negative("variance", variance) ** 0.5
        self.variance = self.sigma ** 2
        super().__init__(self.sigma, kinds=kinds, generator=generator)

    def __repr__(self) -> str:
        return f"GradientNoise(variance={self.variance:g})"


class GradientPruning(_RowTransform):
    """Magnitude pruning: the smallest ``fraction`` of each row's entries (by absolute value) are set
    to zero (Zhu et al., 2019, sec. 5: pruning more than 20% stops DLG; the same operation as top-k
    sparsification, Lin et al., "Deep gradient compression", 2018, without its error feedback).

    Each row keeps ``TopK(1 - fraction).k_for(P)`` entries (at least one); the mask comes from
    :class:`~toolkit.federated.compression.TopK` itself. Backward: multiplied by the mask (exact).

    Args:
        fraction: share of entries pruned per row, in [0, 1).
        kinds: the transfer kinds it prunes.

    Example:
        >>> GradientPruning(0.25)(torch.tensor([[0.1, -3.0, 2.0, -0.2]]), kind="update")
        tensor([[ 0.0000, -3.0000,  2.0000, -0.2000]])
    """

    def __init__(self, fraction: float, *, kinds: Sequence[str] = KINDS):
        self.fraction = validate.fraction("fraction", fraction)
        self._topk = TopK(1.0 - self.fraction, error_feedback=False)
        KindTransform.__init__(self, kinds)

    def mask(self, v: Tensor) -> Tensor:
        """The kept entries of rows ``v`` (K, P), as a 0/1 tensor of ``v``'s dtype."""
        packet = self._topk.compress(v.detach(), torch.arange(len(v)))
        return torch.zeros_like(v).scatter_(1, packet.positions(), 1.0)  # (K, P)

    def _rows(self, v: Tensor) -> Tensor:
        return v * self.mask(v) if self.fraction > 0 else v

    def preimage(self, observed: Tensor) -> tuple[Tensor, Tensor]:
        """Where the true entries of one pruned row lie, given ``observed`` (P,): a nonzero entry was
        kept, exactly; a zero one was pruned, so its magnitude is at most the smallest kept one.
        Returns ``(low, high)``, each (P,)."""
        kept = observed != 0
        if self.fraction == 0 or not bool(kept.any()):
            return observed.clone(), observed.clone()
        bound = observed.abs()[kept].min()
        return torch.where(kept, observed, -bound), torch.where(kept, observed, bound)

    def __repr__(self) -> str:
        return f"GradientPruning(fraction={self.fraction:g})"


class GradientQuantization(_RowTransform):
    """Quantization of each row to ``levels`` magnitudes per sign (Zhu et al., 2019, sec. 5: INT8
    stops DLG, FP16 does not).

    ``stochastic=False``: deterministic uniform rounding, ``step = max|v| / levels``,
    ``q = step * round(v / step)`` (127 levels is symmetric INT8). ``stochastic=True``: QSGD
    (Alistarh et al., "QSGD: communication-efficient SGD via gradient quantization and encoding",
    2017), ``step = ||v||_2 / levels``, rounded up or down at random, unbiased; computed by
    :class:`~toolkit.federated.compression.QSGD` and decoded at once (send the packet itself with
    ``FederatedAveraging(compressor=QSGD(...))`` to save the bytes). Backward: straight-through.

    Args:
        levels: magnitudes per sign, 1 to 127.
        stochastic: QSGD's random rounding (else deterministic).
        generator: QSGD's rounding draws (torch's global RNG when None); unused when deterministic.
        kinds: the transfer kinds it quantizes.

    Example:
        >>> GradientQuantization(levels=2)(torch.tensor([[0.3, -1.0, 0.8]]), kind="update")
        tensor([[ 0.5000, -1.0000,  1.0000]])
    """

    def __init__(self, levels: int = 127, *, stochastic: bool = False, generator: torch.Generator | None = None,
                 kinds: Sequence[str] = KINDS):
        self.levels = validate.positive_int("levels", levels)
        if self.levels > 127:
            raise ValueError(f"levels must be at most 127 (8-bit codes), got {levels!r}")
        self.stochastic = validate.boolean("stochastic", stochastic)
        self.generator = validate.generator(generator)
        KindTransform.__init__(self, kinds)
        self._qsgd = QSGD(self.levels, error_feedback=False)
        forward: Callable[[Tensor], Tensor] = self._qsgd_rows if self.stochastic else self._uniform_rows
        self._apply = straight_through(forward)

    def _uniform_rows(self, v: Tensor) -> Tensor:
        top = v.abs().amax(dim=1, keepdim=True)                    # (K, 1)
        step = torch.where(top > 0, top, torch.ones_like(top)) / self.levels
        return torch.round(v / step) * step                         # (K, P)

    def _qsgd_rows(self, v: Tensor) -> Tensor:
        packet = self._qsgd.compress(v, torch.arange(len(v)), generator=self.generator)
        return packet.decode().to(v.dtype)

    def _rows(self, v: Tensor) -> Tensor:
        return self._apply(v)

    def preimage(self, observed: Tensor) -> tuple[Tensor, Tensor]:
        """Where the true entries of one quantized row lie, given ``observed`` (P,). Deterministic:
        within half a step of the value (``step = max|q| / levels``, exact: the largest entry maps
        to ``levels``). QSGD: within one step, on the same side of zero; the step is ``||v|| / levels``,
        read as the smallest nonzero magnitude (exact when an entry has level 1, else a multiple,
        which widens the intervals but keeps the truth inside). Returns ``(low, high)``, each (P,)."""
        mags = observed.abs()
        if not bool((mags > 0).any()):
            return observed.clone(), observed.clone()
        if not self.stochastic:
            half = mags.max() / self.levels / 2
            return observed - half, observed + half
        step = mags[mags > 0].min()
        low, high = observed - step, observed + step
        return torch.where(observed > 0, low.clamp(min=0), low), torch.where(observed < 0, high.clamp(max=0), high)

    def __repr__(self) -> str:
        return f"GradientQuantization(levels={self.levels}, stochastic={self.stochastic})"


GRADIENT_DEFENSES: dict[str, type[KindTransform]] = {
    "noise": GradientNoise,
    "pruning": GradientPruning,
    "quantization": GradientQuantization,
}
