"""Label defenses for two-party split learning: noise on the cut-layer gradients the label party
sends back, against the norm and direction attacks (``attacks.label_leakage``).

Li et al., "Label leakage and protection in two-party split learning" (ICLR 2022), section 4, and
their code (github.com/OscarcarLi/label-protection, ``custom_gradients_masking.py``, ``solver.py``):

- :class:`MaxNorm`, their heuristic (``--noise_layer_function expectation``): noise that gives every
  row the expected squared norm of the batch's largest, so the norm ranks nothing;
- :class:`Marvell`, class-dependent Gaussian noise minimizing the sum of the two KL divergences
  between the perturbed positive and negative gradient distributions under a noise power budget
  (``sumKL``);
- :class:`IsotropicNoise`, the baseline they compare with (``white_gaussian``).

Each is a split :class:`~toolkit.split.Hook` registered on the label party
(``SplitNN.vanilla(..., labels="server", hooks={"server": Marvell(1.0, generator=g)})``) that
overrides :meth:`gradients`; the perturbed gradient is what crosses the Wire (the client's
transcript holds it) and what the client trains on. Each logs ``noise_power`` per step: the mean
over the batch of ``|noise_i|^2`` actually drawn. The noise is added to the gradient, not to a
tensor on the forward pass, so no straight-through rule is involved.

Example:
    >>> g = torch.tensor([[3.0, 0.0], [0.0, 0.1], [0.2, 0.0]])  # (B, d) true cut-layer gradients
    >>> out = MaxNorm(generator=torch.Generator().manual_seed(0)).gradients(1, g, None)
    >>> out.shape, bool(torch.equal(out[0], g[0]))  # the largest row is left as it is
    (torch.Size([3, 2]), True)
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from torch import Tensor

from toolkit import validate
from toolkit.split import Hook

__all__ = ["LabelDefense", "IsotropicNoise", "MaxNorm", "Marvell", "sum_kl", "solve_marvell"]


class LabelDefense(Hook):
    """Base: flattens the gradient to (B, d), calls :meth:`perturb`, logs ``noise_power``."""

    def __init__(self, *, generator: torch.Generator | None = None):
        self.generator = validate.generator(generator)
        self.values: dict[int, dict[str, float]] = {}  # step -> logged values

    def gradients(self, step: int, gradient: Tensor, labels: Tensor | None) -> Tensor:
        g = gradient.reshape(len(gradient), -1)  # (B, d)
        out, logged = self.perturb(g, labels)
        logged["noise_power"] = float((out - g).square().sum(1).mean()) if len(g) else 0.0
        self.values[step] = logged
        return out.reshape(gradient.shape)

    def perturb(self, g: Tensor, labels: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        """The perturbed (B, d) gradient and any values to log; subclasses override."""
        raise NotImplementedError

    def record(self, step: int) -> dict[str, float]:
        return dict(self.values.get(step, {}))

    def _normal(self, *shape: int, like: Tensor) -> Tensor:
        return torch.randn(*shape, generator=self.generator, dtype=like.dtype, device=like.device)


class IsotropicNoise(LabelDefense):
    """The baseline: i.i.d. Gaussian noise on every coordinate of every row, whatever its label.

    Li et al. (ICLR 2022) compare Marvell with it; their ``white_gaussian`` scales it to the batch
    (``relative=True``): per-coordinate std ``sigma * max_j |g_j| / sqrt(d)``, so ``sigma`` is the
    noise norm in units of the largest gradient (their ``ratio``). With ``relative=False`` the std is
    ``sigma`` itself.

    Args:
        sigma: the noise scale (>= 0; 0 sends the true gradient).
        relative: scale by the batch's largest gradient norm over ``sqrt(d)`` (the paper's form).
        generator: the random stream of the noise.

    Example:
        >>> iso = IsotropicNoise(0.5, generator=torch.Generator().manual_seed(0))
        >>> iso.gradients(1, torch.zeros(2, 3), None).abs().sum() > 0
        tensor(True)
    """

    def __init__(self, sigma: float, *, relative: bool = False, generator: torch.Generator | None = None):
        super().__init__(generator=generator)
        self.sigma = validate.non_negative("sigma", sigma)
        self.relative = validate.boolean("relative", relative)

    def perturb(self, g, labels):
        std = self.sigma
        if self.relative:
            std = std * float(g.norm(dim=1).max()) / math.sqrt(g.shape[1]) if len(g) else 0.0
        return g + std * self._normal(*g.shape, like=g), {}


MODES = ("scalar", "isotropic")


class MaxNorm(LabelDefense):
    """Max-norm alignment: Gaussian noise that raises each row's expected squared norm to the
    batch's largest, ``E|g~_i|^2 = max_j |g_j|^2`` (Li et al., ICLR 2022, "max_norm").

    Args:
        mode: the form of the noise, both with that expectation.

            - ``"scalar"`` (default; the authors' released ``gradient_masking``):
              ``g~_i = g_i * (1 + sigma_i * z_i)``, one standard normal ``z_i`` per row,
              ``sigma_i = sqrt(max_j |g_j|^2 / |g_i|^2 - 1)``. The noise lies along ``g_i``, so the
              direction survives up to a random sign (flipped with probability ``Phi(-1/sigma_i)``);
              a zero row stays zero.
            - ``"isotropic"``: ``g~_i = g_i + s_i * xi_i``, ``xi_i ~ N(0, I_d)``,
              ``s_i = sqrt((max_j |g_j|^2 - |g_i|^2) / d)``: the same expected norm, with the
              direction blurred too.
        generator: the random stream of the noise.

    Example:
        >>> g = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
        >>> out = MaxNorm(generator=torch.Generator().manual_seed(1)).gradients(1, g, None)
        >>> bool(out[1, 0] == 0)  # scalar mode: along the row's own direction
        True
    """

    def __init__(self, *, mode: str = "scalar", generator: torch.Generator | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        super().__init__(generator=generator)
        self.mode = mode

    def perturb(self, g, labels):
        if len(g) == 0:
            return g, {}
        sq = g.square().sum(1, keepdim=True)  # (B, 1) squared norms
        top = sq.max()
        if self.mode == "scalar":
            ratio = torch.where(sq > 0, top / sq.clamp_min(torch.finfo(g.dtype).tiny) - 1, torch.zeros_like(sq))
            return g * (1 + ratio.clamp_min(0).sqrt() * self._normal(len(g), 1, like=g)), {}
        s = ((top - sq).clamp_min(0) / g.shape[1]).sqrt()  # (B, 1) per-row std
        return g + s * self._normal(*g.shape, like=g), {}


# -- Marvell ------------------------------------------------------------------------------------
def sum_kl(lam10: float, lam20: float, lam11: float, lam21: float, *, u: float, v: float, d: int,
           g: float) -> float:
    """KL(P1 || P0) + KL(P0 || P1) for the perturbed gradient distributions of Marvell's model.

    Li et al. (ICLR 2022), section 4.2 (``symKL_objective`` in their ``solver.py``): negatives'
    gradients ~ N(m0, u I) and positives' ~ N(m1, v I) in d dimensions, ``g = |m1 - m0|^2``; class k
    gets Gaussian noise of variance ``lam1k`` along ``m1 - m0`` and ``lam2k`` in each of the d - 1
    directions orthogonal to it. A zero variance facing a nonzero one gives ``inf``; equal
    orthogonal variances count as their limit (as the authors' zero-variance case does).

    Example:
        >>> sum_kl(0, 0, 0, 0, u=1.0, v=1.0, d=5, g=2.0)  # no noise: |m1 - m0|^2 / u
        2.0
    """
    a0, a1 = lam10 + u, lam11 + v  # variances along m1 - m0
    b0, b1 = lam20 + u, lam21 + v  # variances in each orthogonal direction
    if a0 <= 0 or a1 <= 0:
        return math.inf
    if b0 == b1:
        perp = 2.0
    elif min(b0, b1) <= 0:
        return math.inf
    else:
        perp = b0 / b1 + b1 / b0
    return 0.5 * ((d - 1) * perp + (a0 + g) / a1 + (a1 + g) / a0) - d


GRID = 12  # budget splits tried between the orthogonal and the parallel noise before refining


def solve_marvell(*, u: float, v: float, d: int, g: float, p: float,
                  power: float) -> tuple[float, float, float, float, float]:
    """Marvell's noise: ``(lam10, lam20, lam11, lam21, sumKL)`` minimizing :func:`sum_kl` subject to
    ``p (lam11 + (d-1) lam21) + (1-p) (lam10 + (d-1) lam20) <= P``, ``P = power * g``,
    ``0 <= lam2k <= lam1k`` (Li et al., ICLR 2022, the optimization of section 4.2).

    The authors solve it by alternating closed-form and 1-D steps from random starts (their
    ``solver.py``, which recurses without end on some inputs). Here, from the objective's structure:
    the orthogonal term depends only on ``(lam20 + u) / (lam21 + v)`` and is smallest when the two
    are equal, so only the class with the smaller variance gets orthogonal noise, at most enough to
    equalize them (the authors' code makes the same choice); scaling both parallel variances up
    lowers the parallel term, so the budget is spent in full; for a given orthogonal budget the
    parallel term is convex in ``lam10`` on the budget line. So: a grid over the orthogonal budget,
    refined by bounded 1-D searches (scipy's ``minimize_scalar``) around the best point, each point
    solving the convex 1-D parallel problem. Deterministic; ``g == 0``, ``power == 0`` or ``p`` not
    in (0, 1) gives no noise.

    Example:
        >>> lam10, lam20, lam11, lam21, kl = solve_marvell(u=1.0, v=1.0, d=4, g=4.0, p=0.1, power=1.0)
        >>> round(kl, 4) < sum_kl(0, 0, 0, 0, u=1.0, v=1.0, d=4, g=4.0) == 4.0
        True
    """
    if g <= 0 or power <= 0 or not 0 < p < 1:  # no noise
        return 0.0, 0.0, 0.0, 0.0, sum_kl(0, 0, 0, 0, u=u, v=v, d=d, g=g)
    u, v, P = u / g, v / g, float(power)  # sum-KL is invariant to a common scale: solve with g = 1
    cost = (1 - p) * (d - 1) if u <= v else p * (d - 1)  # power per unit of the smaller class's lam2
    top = min(cost * abs(v - u), P * (d - 1) / d) if d > 1 else 0.0  # orthogonal budget worth trying

    def parallel(t: float) -> tuple[float, tuple[float, float, float, float]]:
        lam2 = t / cost if t > 0 else 0.0
        lam20, lam21 = (lam2, 0.0) if u <= v else (0.0, lam2)
        rest = P - t  # (1 - p) lam10 + p lam11 = rest, lam10 >= lam20, lam11 >= lam21
        hi = (rest - p * lam21) / (1 - p)

        def f(lam10: float) -> float:
            return sum_kl(lam10, lam20, (rest - (1 - p) * lam10) / p, lam21, u=u, v=v, d=d, g=1.0)

        lam10 = lam20 if hi <= lam20 else minimize_scalar(
            f, bounds=(lam20, hi), method="bounded", options={"xatol": 1e-10 * P}).x
        ends = [x for x in (lam20, hi) if f(x) < f(lam10)]  # the convex minimum may sit at an end
        lam10 = ends[0] if ends else lam10
        lam = (lam10, lam20, (rest - (1 - p) * lam10) / p, lam21)
        return f(lam10), lam

    grid = np.linspace(0.0, top, GRID) if top > 0 else np.zeros(1)
    values = [parallel(float(t))[0] for t in grid]
    i = int(np.argmin(values))
    t = float(grid[i])
    if top > 0:
        lo, hi = float(grid[max(i - 1, 0)]), float(grid[min(i + 1, GRID - 1)])
        res = minimize_scalar(lambda x: parallel(x)[0], bounds=(lo, hi), method="bounded",
                              options={"xatol": 1e-10 * P})
        t = float(res.x) if res.fun < values[i] else t
    kl, lam = parallel(t)
    return lam[0] * g, lam[1] * g, lam[2] * g, lam[3] * g, float(kl)


class Marvell(LabelDefense):
    """Marvell: class-dependent Gaussian noise on the cut-layer gradients, shaped to minimize the
    label leakage bound sum-KL under a noise power budget (Li et al., "Label leakage and protection
    in two-party split learning", ICLR 2022, section 4.2; their ``KL_gradient_perturb``).

    Per batch (binary labels, 1 = the positive class): the class means ``m0, m1`` and mean
    per-coordinate variances ``u`` (negatives), ``v`` (positives) of the true gradients, ``p`` the
    batch's positive fraction, ``P = power * |m1 - m0|^2``; :func:`solve_marvell` gives the
    variances; row ``i`` of class ``k`` gets ``sqrt(lam2k) xi_i + sqrt(lam1k - lam2k) z_i e`` with
    ``xi_i ~ N(0, I_d)``, ``z_i ~ N(0, 1)``, ``e = (m1 - m0) / |m1 - m0|``. Logs ``sumkl`` and
    ``error_bound = 0.5 - sqrt(sumKL) / 4``, the paper's lower bound on any attacker's balanced
    error (FPR + FNR) / 2 under that Gaussian model (vacuous when negative).

    Simplifications, as in the authors' default (``uv_choice='uv'``, ``dynamic=False``): each class is
    modelled as an isotropic Gaussian; ``P`` is fixed relative to ``|m1 - m0|^2`` (no search for a
    target bound). Added here: a batch holding one class only (common with 1 % positives) uses the
    other class's mean and variance from the last batch that held it, and the positive fraction of
    all labels seen so far; until both classes have been seen the gradient is sent unchanged.

    Args:
        power: the authors' ``init_scale`` (>= 0): the expected squared noise norm per sample
            (averaged over the classes, weighted by ``p``), in units of ``|m1 - m0|^2``.
        generator: the random stream of the noise.

    Example:
        >>> g = torch.tensor([[1.0, 0.0], [1.1, 0.0], [-0.1, 0.0], [-0.1, 0.01]])
        >>> y = torch.tensor([1, 1, 0, 0])
        >>> m = Marvell(1.0, generator=torch.Generator().manual_seed(0))
        >>> out = m.gradients(1, g, y)
        >>> out.shape, m.record(1)["noise_power"] > 0, 0 < m.record(1)["error_bound"] < 0.5
        (torch.Size([4, 2]), True, True)
    """

    def __init__(self, power: float, *, generator: torch.Generator | None = None):
        super().__init__(generator=generator)
        self.power = validate.non_negative("power", power)
        self._stats: dict[int, tuple[Tensor, float]] = {}  # class -> (mean (d,), mean coordinate variance)
        self._counts = [0, 0]  # labels seen per class

    def perturb(self, g, labels):
        if labels is None:
            raise ValueError("Marvell needs the labels of the task its party scores: register it on the "
                             "label party (e.g. hooks={'server': ...} with labels='server')")
        y = validate.labels(labels, "Marvell's labels", n_classes=2, length=len(g))
        present = {k: y == k for k in (0, 1) if bool((y == k).any())}
        for k, rows in present.items():
            cls = g[rows].double()  # (n_k, d)
            self._stats[k] = (cls.mean(0), float(cls.var(0, unbiased=False).mean()))
            self._counts[k] += int(rows.sum())
        if len(self._stats) < 2:
            return g, {"sumkl": math.nan, "error_bound": math.nan}
        (m0, u), (m1, v) = self._stats[0], self._stats[1]
        diff = m1 - m0  # (d,)
        gap = float(diff.square().sum())
        p = float(y.float().mean()) if len(present) == 2 else self._counts[1] / sum(self._counts)
        lam10, lam20, lam11, lam21, kl = solve_marvell(u=u, v=v, d=g.shape[1], g=gap, p=p, power=self.power)
        along = torch.where(y == 1, math.sqrt(max(lam11 - lam21, 0)), math.sqrt(max(lam10 - lam20, 0)))  # (B,)
        iso = torch.where(y == 1, math.sqrt(lam21), math.sqrt(lam20))  # (B,)
        e = (diff / math.sqrt(gap) if gap > 0 else diff).to(g.dtype)  # (d,) unit direction m1 - m0
        noise = (iso.to(g.dtype)[:, None] * self._normal(*g.shape, like=g)
                 + (along.to(g.dtype) * self._normal(len(g), like=g))[:, None] * e[None])
        return g + noise, {"sumkl": kl, "error_bound": 0.5 - math.sqrt(max(kl, 0.0)) / 4}
