"""Local differential privacy on the Wire: the Gaussian mechanism with clipping, per row.

Each row of what crosses (a sample's cut-layer activations, a client's model update; rows and
clipping as in :func:`defenses.transforms.clip_rows`, shared with
:class:`~defenses.activations.Clip`) is clipped to L2 norm ``max_norm`` and gets Gaussian noise of
standard deviation ``noise_multiplier * max_norm`` on every entry: one release of the Gaussian
mechanism with L2 sensitivity ``max_norm`` per row (Dwork & Roth, "The algorithmic foundations of
differential privacy", 2014, Appendix A; the clipped local randomizer of DP split learning and LDP
federated learning, e.g. Titcombe et al., "Practical defences against model inversion attacks for
split neural networks", 2021). It runs as a wire transform on the sender's side, inside its
autograd graph: the gradient that comes back flows through the clipping (the norm included) and
the noise (an added constant).

Epsilon: the receiver sees every row it gets, so there is no amplification by sampling (sample
rate 1.0). A sample's budget composes its own releases, one per pass in which its row crosses
(an epoch of split learning, a round in which the client takes part), through
:class:`toolkit.accounting.PrivacyAccountant`. The mechanism counts what it released; with
``population`` (how many distinct rows cross, each once per pass) the releases per row are
``ceil(rows released / population)``, without it every send is assumed to carry every row
(releases = sends: exact for federated rounds with every client, an upper bound otherwise).

Example:
    >>> mech = GaussianMechanism(1.0, 2.0, generator=torch.Generator().manual_seed(0))
    >>> z = mech(torch.full((4, 3), 5.0), kind="activations")
    >>> z.shape, mech.releases
    (torch.Size([4, 3]), 1)
    >>> mech(torch.ones(2), kind="labels").tolist()  # other kinds pass untouched
    [1.0, 1.0]
    >>> from toolkit.accounting import epsilon
    >>> mech.epsilon() == epsilon(noise_multiplier=2.0, sample_rate=1.0, steps=1, delta=1e-5)
    True
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from defenses.transforms import KindTransform, clip_rows, row_count
from toolkit import validate
from toolkit.accounting import PrivacyAccountant
from toolkit.accounting import noise_multiplier as calibrate

__all__ = ["GaussianMechanism", "spent"]


def spent(accountant: PrivacyAccountant) -> dict[str, float]:
    """``accountant.report()``, with NaN (and a warning) for an accountant that cannot compute this
    budget: Opacus's PRV fails at tiny noise (epsilon in the hundreds or more), where RDP still bounds it."""
    out = {}
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # PRV's log(1 - q) at q = 1, exp overflows
        for name in accountant.accountants:
            try:
                out[f"epsilon_{name}"] = accountant.epsilon(accountant=name)
            except (RuntimeError, ValueError, OverflowError) as err:
                warnings.warn(f"the {name.upper()} accountant cannot compute this budget ({err}); reporting NaN",
                              RuntimeWarning, stacklevel=3)
                out[f"epsilon_{name}"] = math.nan
    out["delta"] = accountant.delta
    return out


class GaussianMechanism(KindTransform):
    """Clip each row to ``max_norm`` and add N(0, (noise_multiplier * max_norm)^2) per entry.

    Args:
        max_norm: the L2 bound of a row (the mechanism's sensitivity).
        noise_multiplier: noise std over ``max_norm`` (0: clipping only, epsilon inf).
        generator: draws the noise (same seed, same numbers).
        kinds: the wire kinds it acts on, e.g. ``"activations"`` or ``("update",)``.
        delta: the delta epsilon is reported at.
        population: distinct rows that cross, each once per pass (split: ``n_train``, plus
            ``n_test`` when every epoch evaluates; federated: the number of clients), or None.

    A :class:`~defenses.transforms.KindTransform`: it passes other kinds through and refuses a
    compressed update (a Packet: put the mechanism on the dense update, no compressor). Its rows
    and its clipping are :func:`defenses.transforms.clip_rows`, the same as
    :class:`~defenses.activations.Clip`: a 1-D ``"activations"`` tensor is that many samples, a
    1-D ``"update"`` one client's.
    """

    def __init__(self, max_norm: float, noise_multiplier: float, *, generator: torch.Generator,
                 kinds: str | Sequence[str] = ("activations",), delta: float = 1e-5, population: int | None = None):
        self.max_norm = validate.positive("max_norm", max_norm)
        self.noise_multiplier = validate.non_negative("noise_multiplier", noise_multiplier)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"the Gaussian mechanism draws noise: generator must be a torch.Generator, "
                            f"got {type(generator).__name__}")
        self.generator = generator
        super().__init__(kinds)
        self.delta = validate.fraction("delta", delta, zero=False, one=False)
        self.population = None if population is None else validate.positive_int("population", population)
        self.sends = 0   # sends it transformed
        self.rows = 0    # rows it released, over all sends

    @classmethod
    def for_budget(cls, *, epsilon: float, delta: float, releases: int, max_norm: float,
                   generator: torch.Generator, kinds: str | Sequence[str] = ("activations",),
                   population: int | None = None, accountant: str = "rdp") -> GaussianMechanism:
        """The mechanism whose noise spends ``epsilon`` at ``delta`` per row over ``releases``
        releases of that row (sample rate 1.0); ValueError when no noise reaches it."""
        z = calibrate(target_epsilon=epsilon, delta=delta, sample_rate=1.0, steps=releases, accountant=accountant)
        return cls(max_norm, z, generator=generator, kinds=kinds, delta=delta, population=population)

    def apply_on(self, t: Tensor, kind: str) -> Tensor:
        out = clip_rows(t, self.max_norm, kind=kind)
        if self.noise_multiplier > 0:
            noise = torch.randn(t.shape, generator=self.generator, dtype=t.dtype, device=t.device)
            out = out + noise * (self.noise_multiplier * self.max_norm)
        self.sends += 1
        self.rows += row_count(t, kind)
        return out

    @property
    def releases(self) -> int:
        """Releases of one row so far (see the module docstring)."""
        return self.sends if self.population is None else math.ceil(self.rows / self.population)

    def epsilon(self, releases: int | None = None, *, delta: float | None = None, accountant: str = "rdp") -> float:
        """Epsilon of one row (sample or client) after ``releases`` of it (default: :attr:`releases`)."""
        k = self._releases(releases)
        if not k:
            return 0.0
        if not self.noise_multiplier:
            return math.inf
        with np.errstate(divide="ignore"):  # Opacus's PRV takes log(1 - q), -inf at sample rate 1: expected
            return self._accountant(k).epsilon(delta, accountant=accountant)

    def report(self, releases: int | None = None) -> dict[str, float]:
        """``{"epsilon_rdp", "epsilon_prv", "delta", "releases"}``: history columns."""
        k = self._releases(releases)
        if k and self.noise_multiplier:
            return {**spent(self._accountant(k)), "releases": k}
        eps = math.inf if k else 0.0
        return {"epsilon_rdp": eps, "epsilon_prv": eps, "delta": self.delta, "releases": k}

    def _releases(self, releases: int | None) -> int:
        return self.releases if releases is None else validate.non_negative_int("releases", releases)

    def _accountant(self, releases: int) -> PrivacyAccountant:
        acc = PrivacyAccountant(delta=self.delta)
        acc.step(noise_multiplier=self.noise_multiplier, sample_rate=1.0, steps=releases)
        return acc

    def __repr__(self) -> str:
        return (f"GaussianMechanism(max_norm={self.max_norm:g}, noise_multiplier={self.noise_multiplier:.4g}, "
                f"kinds={self.kinds}, {self.rows} rows in {self.sends} sends)")
