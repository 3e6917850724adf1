"""Activation defenses on the Wire: Gaussian and Laplace noise, cut-layer dropout, quantization and
per-row norm clipping, each a wire transform ``t(tensor, *, kind) -> tensor``.

He, Zhang, Lee, "Attacking and protecting data privacy in edge-cloud collaborative inference
systems" (IEEE Internet of Things Journal, 2020) perturb the cut-layer activations before they
leave the client: additive Gaussian or Laplace noise, or dropout of cut-layer entries. They report
on MNIST that noise small enough to keep accuracy above 95 % still lets an inverse network reach
SSIM > 0.4, while dropout reaches SSIM < 0.25 at the same accuracy. ``benchmarks/
activation_defenses.py`` measures both here against the inverse network trained on defended
activations (an attacker who knows the defense and its parameters). Measured there (MNIST 8,000 /
2,000, a conv 5x5 x 8 client, 10 epochs; 256 test images, inverse network on 4,000 aux images),
accuracy, then SSIM for the adaptive / the naive (clean-trained) attacker, at the largest strength
of a grid keeping accuracy above 95 %:

    cut at ReLU1: none 97.85 %, 0.980; Gaussian sigma 0.3 95.60 %, 0.853 / 0.387;
                  Laplace b 0.3 95.65 %, 0.845 / 0.350; dropout 0.7 96.20 %, 0.627 / 0.763
    cut at pool1: none 97.85 %, 0.968; Gaussian sigma 0.8 95.75 %, 0.883 / 0.553;
                  Laplace b 0.5 95.55 %, 0.895 / 0.790; dropout 0.6 95.25 %, 0.697 / 0.796

Dropout is the stronger at equal accuracy against the attacker who knows the defense (and the
deeper cut needs the smaller rate, as He et al. found), but nowhere near their SSIM < 0.25: the
best of the two attackers still gets 0.76-0.80. Noise looks strong only against the naive one.

Every transform acts on the kinds in ``kinds`` (``"activations"`` by default; e.g. also
``"gradients"`` or ``"update"``) and returns any other kind untouched. It runs on the sender's
side inside its autograd graph (the Wire applies it before the detached copy crosses), so the
gradient that comes back flows through it: exactly for noise (the identity), dropout (the same
mask and scale) and clipping (through the norm); straight-through for quantization (documented on
:class:`Quantize`).

They apply in every phase, at inference (``wire.during("eval")``) as in training. The defense
protects what crosses, and the activations a model-inversion attack reads are typically the
test-time ones; the server, trained on defended activations, sees the same distribution at test
time, and the accuracy a benchmark reports is the accuracy under the defense. (A transform does not
see the phase; a run that wants clean inference uses a wire without it.)

Randomized transforms draw from the ``generator`` given to them (torch's global RNG when None):
the same seed gives the same noise and masks. They are written by hand: ``torch.nn.functional.
dropout`` and ``torch.distributions.Laplace`` take no generator.

Example:
    >>> from toolkit.wire import Wire
    >>> wire = Wire([GaussianNoise(0.5, generator=torch.Generator().manual_seed(0))])
    >>> z = wire.send(torch.zeros(1000, 8), sender="client", receiver="server", kind="activations")
    >>> round(z.std().item(), 1)
    0.5
    >>> wire.send(torch.zeros(3), sender="server", receiver="client", kind="gradients").tolist()
    [0.0, 0.0, 0.0]
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from toolkit import validate
from defenses.transforms import KindTransform, clip_rows
from toolkit.wire import straight_through

__all__ = ["GaussianNoise", "LaplaceNoise", "CutDropout", "Quantize", "Clip", "ACTIVATION_DEFENSES"]


class _OnKinds(KindTransform):
    """An activation defense: a :class:`~defenses.transforms.KindTransform` with a short repr."""

    def _args(self) -> str:
        raise NotImplementedError  # pragma: no cover

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._args()}, kinds={self.kinds!r})"


class GaussianNoise(_OnKinds):
    """Add i.i.d. N(0, sigma^2) noise to every entry (He, Zhang, Lee, 2020). Backward: the identity
    (exact: the noise does not depend on the tensor).

    Args:
        sigma: standard deviation (>= 0; 0 sends the tensor unchanged), in the activations' units.
        kinds: which kinds it acts on.
        generator: where the noise is drawn (torch's global RNG when None).

    Example:
        >>> t = GaussianNoise(1.0, generator=torch.Generator().manual_seed(0))
        >>> z = t(torch.zeros(10000), kind="activations")
        >>> abs(z.mean().item()) < 0.05, round(z.std().item(), 1)
        (True, 1.0)
    """

    def __init__(self, sigma: float, *, kinds: str | Sequence[str] = "activations",
                 generator: torch.Generator | None = None):
        self.sigma = validate.non_negative("sigma", sigma)
        super().__init__(kinds)
        self.generator = validate.generator(generator)

    def apply(self, t: Tensor) -> Tensor:
        noise = torch.randn(t.shape, generator=self.generator, dtype=t.dtype, device=t.device)
        return t + self.sigma * noise

    def _args(self) -> str:
        return f"sigma={self.sigma}"


class LaplaceNoise(_OnKinds):
    """Add i.i.d. Laplace(0, scale) noise to every entry (He, Zhang, Lee, 2020): density
    exp(-|n| / scale) / (2 scale), standard deviation sqrt(2) * scale. Drawn as the difference of
    two Exp(1) samples times ``scale``. Backward: the identity (exact).

    Args:
        scale: the Laplace scale b (>= 0; 0 sends the tensor unchanged).
        kinds: which kinds it acts on.
        generator: where the noise is drawn (torch's global RNG when None).

    Example:
        >>> t = LaplaceNoise(1.0, generator=torch.Generator().manual_seed(0))
        >>> z = t(torch.zeros(20000), kind="activations")
        >>> round(z.abs().mean().item(), 1)  # E|n| = scale
        1.0
    """

    def __init__(self, scale: float, *, kinds: str | Sequence[str] = "activations",
                 generator: torch.Generator | None = None):
        self.scale = validate.non_negative("scale", scale)
        super().__init__(kinds)
        self.generator = validate.generator(generator)

    def apply(self, t: Tensor) -> Tensor:
        e = torch.empty((2, *t.shape), dtype=t.dtype, device=t.device).exponential_(generator=self.generator)
        return t + self.scale * (e[0] - e[1])

    def _args(self) -> str:
        return f"scale={self.scale}"


class CutDropout(_OnKinds):
    """Zero each entry independently with probability ``rate`` (He, Zhang, Lee, 2020: dropout on the
    cut layer, in training and at inference). Backward: the same mask and scale (exact).

    By default the kept entries are scaled by 1 / (1 - rate) (inverted dropout, as
    ``torch.nn.Dropout``), so every entry keeps its expected value and a server sees activations of
    the same mean size whatever the rate. ``rescale=False`` only zeroes, as He et al. describe it.
    With the defense on in both phases the choice is a constant factor the server's first layer
    absorbs: it changes neither what is hidden (which entries are zero) nor what an attacker who
    standardizes the activations sees.

    Args:
        rate: drop probability, in [0, 1) (0 sends the tensor unchanged).
        rescale: scale the kept entries by 1 / (1 - rate).
        kinds: which kinds it acts on.
        generator: where the masks are drawn (torch's global RNG when None).

    Example:
        >>> t = CutDropout(0.75, generator=torch.Generator().manual_seed(0))
        >>> z = t(torch.ones(10000), kind="activations")
        >>> round((z == 0).float().mean().item(), 2), sorted(set(z.tolist()))
        (0.75, [0.0, 4.0])
    """

    def __init__(self, rate: float, *, rescale: bool = True, kinds: str | Sequence[str] = "activations",
                 generator: torch.Generator | None = None):
        self.rate = validate.fraction("rate", rate)
        self.rescale = validate.boolean("rescale", rescale)
        super().__init__(kinds)
        self.generator = validate.generator(generator)

    def apply(self, t: Tensor) -> Tensor:
        keep = torch.rand(t.shape, generator=self.generator, device=t.device) >= self.rate
        scale = 1.0 / (1.0 - self.rate) if self.rescale else 1.0
        return t * (keep.to(t.dtype) * scale)

    def _args(self) -> str:
        return f"rate={self.rate}, rescale={self.rescale}"


class Quantize(_OnKinds):
    """Round every entry to one of 2**bits evenly spaced levels of a range (uniform quantization,
    as the cut-layer quantization of Jacob et al., "Quantization and training of neural networks for
    efficient integer-arithmetic-only inference", 2018): values outside the range are clamped to it.
    The range is ``value_range`` if given, else the tensor's own min and max (per tensor, per send;
    a receiver of integer codes would also need these two numbers).

    Backward: straight-through (``toolkit.wire.straight_through``): the gradient that comes back
    passes unchanged, clamped entries included, since rounding has no useful gradient.

    What crosses is the dequantized float tensor (the server computes with it; the Wire counts its
    float bytes, not the ``bits`` per entry that integer codes would take).

    Args:
        bits: 1 to 24 (float32 holds at most 24 bits of mantissa).
        value_range: (low, high), low < high; None for the tensor's min and max.
        kinds: which kinds it acts on.

    Example:
        >>> q = Quantize(2, value_range=(0.0, 3.0))
        >>> q(torch.tensor([-1.0, 0.4, 1.6, 2.2, 9.0]), kind="activations").tolist()
        [0.0, 0.0, 2.0, 2.0, 3.0]
    """

    def __init__(self, bits: int, *, value_range: tuple[float, float] | None = None,
                 kinds: str | Sequence[str] = "activations"):
        self.bits = validate.positive_int("bits", bits)
        if self.bits > 24:
            raise ValueError(f"bits must be at most 24 (float32 holds 24 bits of mantissa), got {bits!r}")
        if value_range is not None:
            if not isinstance(value_range, (tuple, list)) or len(value_range) != 2:
                raise ValueError(f"value_range must be (low, high) or None, got {value_range!r}")
            low = validate.number("value_range low", value_range[0])
            high = validate.number("value_range high", value_range[1])
            if not low < high:
                raise ValueError(f"value_range must have low < high, got {tuple(value_range)!r}")
            value_range = (low, high)
        self.value_range = value_range
        super().__init__(kinds)

    def _round(self, t: Tensor) -> Tensor:
        if self.value_range is None:
            low, high = t.min(), t.max()
            if not bool(high > low):
                return t.clone()  # a constant tensor is exactly representable
        else:
            low, high = self.value_range
        step = (high - low) / (2 ** self.bits - 1)
        return low + torch.round((t.clamp(low, high) - low) / step) * step

    def apply(self, t: Tensor) -> Tensor:
        return straight_through(self._round)(t) if t.numel() else t

    def _args(self) -> str:
        return f"bits={self.bits}, value_range={self.value_range}"


class Clip(_OnKinds):
    """Scale each row to L2 norm at most ``max_norm`` (rows along dim 0: one sample's activations,
    or one client's update in a stacked send; a 1-D tensor is a batch of one-entry samples on the
    ``"activations"`` and ``"gradients"`` kinds, one row on the others:
    :func:`defenses.transforms.clip_rows`). Rows already within the bound are unchanged. Bounding
    each sample's norm is the clipping step of the Gaussian mechanism (Abadi et al., "Deep learning
    with differential privacy", 2016), here on what crosses; :class:`defenses.dp_local.
    GaussianMechanism` adds the noise after the same clipping. Backward: through the norm (exact;
    the scale is part of the graph).

    Args:
        max_norm: the bound (> 0).
        kinds: which kinds it acts on.

    Example:
        >>> Clip(1.0)(torch.tensor([[3.0, 4.0], [0.3, 0.4]]), kind="activations").tolist()
        [[0.6000000238418579, 0.800000011920929], [0.30000001192092896, 0.4000000059604645]]
    """

    def __init__(self, max_norm: float, *, kinds: str | Sequence[str] = "activations"):
        self.max_norm = validate.positive("max_norm", max_norm)
        super().__init__(kinds)

    def apply_on(self, t: Tensor, kind: str) -> Tensor:
        return clip_rows(t, self.max_norm, kind=kind)

    def _args(self) -> str:
        return f"max_norm={self.max_norm}"


ACTIVATION_DEFENSES = {
    "gaussian": GaussianNoise,
    "laplace": LaplaceNoise,
    "dropout": CutDropout,
    "quantize": Quantize,
    "clip": Clip,
}
