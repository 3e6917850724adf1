"""Splintering: the client splits its data into randomized shares, mixes in decoys, and lets the
server compute on all of them; only the client can reassemble the true result.

Vepakomma, Balla, Raskar, "Splintering with distributions: a stochastic decoy scheme for private
computation" (arXiv 2007.02719, 2020). The full paper was not available to us: the construction
below is ours, written from its abstract (set-ups i and ii) and stated exactly, so that what it
hides can be checked. Set-up (iii), a split-learning server's first layer run on shares of the
cut-layer activations, is in :mod:`defenses.splintering_split`.

**Shares** (:class:`Splinter`, for a linear operation ``f``). For each sample ``x`` (any shape,
``D`` numbers) the client draws ``k = n_shares`` secret coefficients ``c_i = ±U(0.5, 1.5)`` (random
sign) and noise ``u_i ~ N(0, scale² I)``, and corrects the noise along the residual so that the
coefficients reassemble ``x`` exactly::

    r = x - sum_i c_i u_i,   s_i = u_i + c_i r / |c|²,   so   sum_i c_i s_i = x.

``n_decoys`` decoys are drawn from the distribution of the shares' noise part (``u_i`` projected as
above, i.e. ``N(0, (1 - c_i²/|c|²) scale² I)`` with ``c`` drawn afresh), so a share and a decoy
differ only by the share's mean ``c_i x / |c|²``. Shares and decoys of the whole batch cross the
Wire in one random order (kind ``"shares"``); the server computes ``f`` on every row and sends the
results back (kind ``"results"``); the client keeps ``sum_i c_i f(s_i) = f(x)`` and drops the
decoys' results. Any ``f`` that is linear and acts row by row qualifies; :func:`check_linear`
refuses others (checked numerically before anything is drawn or sent).

**Masking** (set-up ii, :func:`outsource` with ``"inverse"``): inversion is not linear, so shares
cannot be reassembled. The client sends ``A = P M Q`` with secret Gaussian ``P, Q`` (entries
``N(0, 1/n)``), plus ``n_decoys`` decoys ``P' G Q'`` (``G`` Gaussian with ``M``'s Frobenius norm),
shuffled; the server inverts every matrix; the client keeps ``Q inv(A) P = inv(M)`` (two
products, no inversion on its side).

What is hidden, from whom, assuming the server is honest-but-curious (it computes ``f`` as asked,
reads everything it receives, knows this scheme and its parameters, but not the draws):

* Shares hide ``x`` only up to a subspace: ``x = sum c_i s_i`` lies in the span of the rows the
  server received for it. With ``k + n_decoys < D`` that span is a strong clue: a server with a
  prior on the data (:func:`span_attack`, a Gaussian prior fitted to public samples) rebuilds ``x``
  from its most plausible point. Only once ``k + n_decoys >= D`` does the span say nothing, and
  the attack falls back to the prior mean. The tests and ``benchmarks/splintering.py`` measure
  its error per decoy count; the cost is ``k + n_decoys`` times the bytes, both ways.
* The rows of the whole batch are shuffled together, so the server does not know which rows
  belong to one sample; :func:`span_attack` is given that grouping (one sample per send), the
  worst case for the client.
* Set-up (i), the other way: the client learns ``<s_i, y>`` for every share and decoy and every
  record ``y`` of the server's database, i.e. each record's projection onto the span of what it
  sent. With ``k + n_decoys >= D`` the client recovers the whole database (tested). The two
  parties' privacy pull in opposite directions; nothing here resolves that.
* Masking reveals a matrix whose distribution depends on ``M`` only through its singular values
  (Gaussian masks are rotation invariant); decoys hide which one is real, but a server that knows
  ``M``'s spectrum is unusual (e.g. well conditioned) may tell it apart. ``|det A| = |det P| |det
  M| |det Q|`` is another noisy clue. Precision: ``A``'s condition number is up to the masks'
  times ``M``'s, so use float64 (48x48 in ``benchmarks/splintering.py``: max error 3e-8 to 6e-7).
* Nothing here is cryptographic: there is no proof and no security parameter. Written by hand:
  no library implements splintering.

Example (inner products with a server's private records, set-up i):
    >>> from toolkit.wire import Wire
    >>> wire, g = Wire(), torch.Generator().manual_seed(0)
    >>> x, records = torch.ones(1, 4), torch.eye(4)[:3]
    >>> got = inner_products(x, records, splinter=Splinter(2, 3, generator=g), wire=wire)
    >>> got.round(decimals=4).tolist(), [t.tensor.shape[0] for t in wire.observed(by="server")]
    ([[1.0, 1.0, 1.0]], [5])
"""
from __future__ import annotations

from collections.abc import Callable
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from toolkit import metrics, validate
from toolkit.wire import Wire

__all__ = ["Splinter", "Secret", "check_linear", "splintered", "inner_products", "outsource",
           "MASKED", "GaussianPrior", "span_attack", "decoy_sweep"]


@dataclass(frozen=True)
class Secret:
    """What only the client keeps: for every row sent, its sample and reassembly weight (0: decoy)."""

    owner: Tensor    # (R,) long: the sample each row belongs to
    weight: Tensor   # (R,) its coefficient c_i; 0 for a decoy
    n: int           # samples in the batch


class Splinter:
    """Splits a batch into ``n_shares`` shares per sample plus ``n_decoys`` decoys (module docstring).

    Args:
        n_shares: shares per sample, at least 2 (one share would be the sample, scaled).
        n_decoys: decoys per sample, drawn like the shares' noise.
        scale: standard deviation of the shares' noise, in the data's units; larger hides the
            shares' mean better and costs float precision in the reassembly.
        generator: every draw (coefficients, noise, decoys, order); same seed, same shares.

    Example:
        >>> sp = Splinter(2, 1, generator=torch.Generator().manual_seed(0))
        >>> rows, secret = sp.split(torch.arange(6.0).reshape(2, 3))
        >>> rows.shape, torch.allclose(sp.reassemble(rows, secret), torch.arange(6.0).reshape(2, 3), atol=1e-5)
        (torch.Size([6, 3]), True)
    """

    def __init__(self, n_shares: int = 2, n_decoys: int = 0, *, scale: float = 1.0,
                 generator: torch.Generator | None = None):
        n_shares = validate.positive_int("n_shares", n_shares)
        if n_shares < 2:
            raise ValueError(f"n_shares must be at least 2 (a single share is the secret scaled), got {n_shares}")
        self.n_shares = n_shares
        self.n_decoys = validate.non_negative_int("n_decoys", n_decoys)
        self.scale = validate.positive("scale", scale)
        self.generator = validate.generator(generator)

    @property
    def rows_per_sample(self) -> int:
        return self.n_shares + self.n_decoys

    def _coefficients(self, *shape: int, dtype) -> Tensor:
        g = self.generator
        magnitude = 0.5 + torch.rand(*shape, generator=g, dtype=dtype)
        sign = torch.randint(0, 2, shape, generator=g).to(dtype) * 2 - 1
        return magnitude * sign

    def split(self, x: Tensor) -> tuple[Tensor, Secret]:
        """Shares and decoys of every sample of ``x`` (B, ...), shuffled: rows (B * m, ...), and the Secret."""
        x = validate.finite(validate.tensor(x, "x", min_dim=1), "x", hint="splinter finite data only")
        if not x.is_floating_point():
            raise ValueError(f"x must be floating point to be split into shares, got {x.dtype}")
        b, shape, k, d, g = len(x), x.shape[1:], self.n_shares, self.n_decoys, self.generator
        flat = x.detach().reshape(b, -1)                                      # (B, D)
        c = self._coefficients(b, k, dtype=x.dtype)                           # (B, k) secret
        u = torch.randn(b, k, flat.shape[1], generator=g, dtype=x.dtype) * self.scale
        residual = flat - torch.einsum("bk,bkd->bd", c, u)
        shares = u + c[..., None] * residual[:, None] / (c ** 2).sum(1)[:, None, None]
        fake = self._coefficients(b, d, k, dtype=x.dtype)                     # fictitious coefficients
        shrink = (1 - fake[..., 0] ** 2 / (fake ** 2).sum(-1)).sqrt()         # the noise part's spread
        decoys = torch.randn(b, d, flat.shape[1], generator=g, dtype=x.dtype) * self.scale * shrink[..., None]
        rows = torch.cat([shares, decoys], 1).reshape(b * (k + d), *shape)
        weight = torch.cat([c, torch.zeros(b, d, dtype=x.dtype)], 1).reshape(-1)
        owner = torch.arange(b).repeat_interleave(k + d)
        order = torch.randperm(len(rows), generator=g)
        return rows[order], Secret(owner[order], weight[order], b)

    @staticmethod
    def reassemble(results: Tensor, secret: Secret) -> Tensor:
        """``sum_i c_i f(s_i)`` per sample from the server's results (R, ...), in the rows' order."""
        if len(results) != len(secret.owner):
            raise ValueError(f"got {len(results)} results for {len(secret.owner)} rows sent")
        w = secret.weight.to(results.dtype).reshape(-1, *([1] * (results.dim() - 1)))
        out = torch.zeros(secret.n, *results.shape[1:], dtype=results.dtype)
        return out.index_add(0, secret.owner, w * results)

    def __repr__(self) -> str:
        return f"Splinter(n_shares={self.n_shares}, n_decoys={self.n_decoys}, scale={self.scale:g})"


def check_linear(operation: Callable[[Tensor], Tensor], example: Tensor, *, rtol: float | None = None) -> None:
    """ValueError unless ``operation`` is linear and acts row by row on batches shaped like ``example``.

    Checks ``f(0) = 0``, ``f(a x + b y) = a f(x) + b f(y)`` and ``f(X)[i] = f(X[i:i+1])[0]`` on fixed
    probe inputs (a private generator, so the check draws nothing from the caller's); tolerance
    ``rtol`` relative to ``|a f(x)| + |b f(y)|`` (1e-4 in float32, 1e-9 in float64 by default).
    """
    if not callable(operation):
        raise ValueError(f"operation must be a callable f(batch) -> batch, got {type(operation).__name__}")
    probe = torch.Generator().manual_seed(2007_02719)
    shape, dtype = example.shape[1:], example.dtype
    rtol = (1e-4 if dtype != torch.float64 else 1e-9) if rtol is None else rtol
    x, y = (torch.randn(3, *shape, generator=probe, dtype=dtype) for _ in range(2))
    a, b = 0.7, -1.3
    try:
        with torch.no_grad():
            fx, fy, fxy, f1 = (operation(t) for t in (x, y, a * x + b * y, x[1:2]))
    except Exception as err:  # noqa: BLE001  (the user's function; its error is reported, not raised)
        raise ValueError(f"splintering could not run the operation on a probe batch of shape "
                         f"{tuple(x.shape)}: {type(err).__name__}: {err}") from err
    if not all(isinstance(t, Tensor) for t in (fx, fy, fxy, f1)) or fx.dim() < 1 or len(fx) != len(x):
        raise ValueError("operation must return one result row per input row (a tensor, batch first)")
    size = float((a * fx).abs().sum() + (b * fy).abs().sum()) + 1e-30
    try:
        with torch.no_grad():
            f0 = operation(torch.zeros_like(x))
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"splintering on an operation that is not linear: it fails on 0 ({err})") from err
    if not isinstance(f0, Tensor) or not float(f0.abs().sum()) <= rtol * size:
        raise ValueError(f"splintering on an operation that is not linear: f(0) is not 0 (sum |f(0)| = "
                         f"{float(f0.abs().sum()) if isinstance(f0, Tensor) else f0!r}); an affine map's offset must be added after reassembly")
    gap = float((fxy - (a * fx + b * fy)).abs().sum())
    if not gap <= rtol * size:
        raise ValueError(f"splintering on an operation that is not linear: f(a x + b y) differs from "
                         f"a f(x) + b f(y) by {gap / size:.3g} (relative), so sum c_i f(s_i) would not be "
                         f"f(x); for a matrix inverse use outsource(..., 'inverse')")
    if not float((f1[0] - fx[1]).abs().sum()) <= rtol * size:
        raise ValueError("splintering needs an operation that acts on each row alone; this one mixes the "
                         "rows of a batch (e.g. batch norm in training mode)")


def splintered(x: Tensor, operation: Callable[[Tensor], Tensor], *, splinter: Splinter, wire: Wire,
               client: str = "client", server: str = "server") -> Tensor:
    """``operation(x)`` computed by ``server`` on shares and decoys of ``x``; reassembled by ``client``.

    ``operation`` is the server's (its private data stays in it) and must be linear, row by row
    (:func:`check_linear`, checked before anything is drawn or sent). Shares cross as ``"shares"``,
    the results come back as ``"results"``.
    """
    if not isinstance(splinter, Splinter) or not isinstance(wire, Wire):
        raise ValueError(f"splintered needs a Splinter and a Wire, got {type(splinter).__name__} and "
                         f"{type(wire).__name__}")
    x = validate.finite(validate.tensor(x, "x", min_dim=1), "x", hint="splinter finite data only")
    check_linear(operation, x[:1])
    rows, secret = splinter.split(x)
    got = wire.send(rows, sender=client, receiver=server, kind="shares")
    with torch.no_grad():
        results = operation(got)                                            # on the server
    back = wire.send(results, sender=server, receiver=client, kind="results")
    return Splinter.reassemble(back, secret)


def inner_products(x: Tensor, database: Tensor, *, splinter: Splinter, wire: Wire,
                   client: str = "client", server: str = "server") -> Tensor:
    """Set-up (i): ``x @ database.T`` (B, K) for the client's queries ``x`` (B, D) and the server's
    records (K, D), which never cross (see the module docstring for what each side learns)."""
    database = validate.finite(validate.tensor(database, "database", min_dim=2), "database")
    if database.dim() != 2 or x.dim() != 2 or x.shape[1] != database.shape[1]:
        raise ValueError(f"inner products need queries (B, D) and records (K, D), got "
                         f"{tuple(x.shape)} and {tuple(database.shape)}")
    return splintered(x, lambda s: s @ database.T.to(s.dtype), splinter=splinter, wire=wire,
                      client=client, server=server)


# -- set-up (ii): an operation on the client's own matrix ------------------------------------------
def _masks(b: int, n: int, g, dtype) -> Tensor:
    return torch.randn(b, n, n, generator=g, dtype=dtype) / n ** 0.5


def _outsource_inverse(m: Tensor, splinter: Splinter, send: Callable) -> Tensor:
    if torch.linalg.matrix_rank(m.double()).min() < m.shape[-1]:
        raise ValueError("the matrix is singular: it has no inverse to outsource")
    b, n, d, g = len(m), m.shape[-1], splinter.n_decoys, splinter.generator
    p, q = _masks(b, n, g, m.dtype), _masks(b, n, g, m.dtype)              # (B, n, n) secret masks
    norm = torch.linalg.matrix_norm(m)[:, None, None, None]
    fake = torch.randn(b, d, n, n, generator=g, dtype=m.dtype)
    fake = fake * norm / torch.linalg.matrix_norm(fake)[..., None, None]
    decoys = _masks(b * d, n, g, m.dtype).reshape(b, d, n, n) @ fake @ _masks(b * d, n, g, m.dtype).reshape(b, d, n, n)
    rows = torch.cat([(p @ m @ q)[:, None], decoys], 1).reshape(b * (d + 1), n, n)
    order = torch.randperm(len(rows), generator=g)
    inverted = send(rows[order], torch.linalg.inv)
    real = torch.empty_like(inverted)
    real[order] = inverted
    return q @ real.reshape(b, d + 1, n, n)[:, 0] @ p                      # Q inv(P M Q) P = inv(M)


MASKED: dict[str, Callable] = {"inverse": _outsource_inverse}  # non-linear operations with a reassembly


def outsource(matrix: Tensor, operation: str | Callable[[Tensor], Tensor], *, splinter: Splinter,
              wire: Wire, client: str = "client", server: str = "server") -> Tensor:
    """Set-up (ii): the server computes ``operation`` on the client's ``matrix`` (n, n) or (B, n, n).

    ``operation`` is a name in :data:`MASKED` (``"inverse"``: multiplicative masking and decoys) or
    a linear callable (shares and decoys, :func:`splintered`); anything else is a ValueError.

    Example:
        >>> from toolkit.wire import Wire
        >>> m = torch.tensor([[2.0, 1.0], [0.0, 4.0]], dtype=torch.float64)
        >>> sp = Splinter(2, 3, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(outsource(m, "inverse", splinter=sp, wire=Wire()), torch.linalg.inv(m))
        True
    """
    if not isinstance(splinter, Splinter) or not isinstance(wire, Wire):
        raise ValueError(f"outsource needs a Splinter and a Wire, got {type(splinter).__name__} and "
                         f"{type(wire).__name__}")
    matrix = validate.finite(validate.tensor(matrix, "matrix", min_dim=2), "matrix")
    single = matrix.dim() == 2
    batch = matrix[None] if single else matrix
    if batch.dim() != 3 or batch.shape[-1] != batch.shape[-2] or not matrix.is_floating_point():
        raise ValueError(f"matrix must be square floating point, (n, n) or (B, n, n), got "
                         f"{tuple(matrix.shape)} {matrix.dtype}")
    if isinstance(operation, str):
        if operation not in MASKED:
            raise ValueError(f"splintering on an operation that is not linear: {operation!r} has no "
                             f"reassembly here; masked operations are {sorted(MASKED)}, or pass a linear callable")

        def send(rows: Tensor, fn: Callable) -> Tensor:
            got = wire.send(rows, sender=client, receiver=server, kind="shares")
            return wire.send(fn(got), sender=server, receiver=client, kind="results")
        out = MASKED[operation](batch, splinter, send)
    else:
        out = splintered(batch, operation, splinter=splinter, wire=wire, client=client, server=server)
    return out[0] if single else out


# -- the server's best estimate of the secret from the shares ------------------------------------
class GaussianPrior:
    """A Gaussian fitted to public samples (N, ...): what a curious server knows about the data.

    ``ridge`` is added to the covariance's diagonal (relative to its mean variance) so it inverts.
    """

    def __init__(self, public: Tensor, *, ridge: float = 1e-3):
        public = validate.finite(validate.tensor(public, "public", min_dim=2), "public")
        flat = public.detach().double().reshape(len(public), -1)
        if len(flat) < 2:
            raise ValueError(f"a prior needs at least 2 public samples, got {len(flat)}")
        self.mean = flat.mean(0)
        cov = torch.cov(flat.T).reshape(flat.shape[1], flat.shape[1])
        cov = cov + validate.positive("ridge", ridge) * float(cov.diagonal().mean()) * torch.eye(len(cov), dtype=cov.dtype)
        self.whiten = torch.linalg.inv(torch.linalg.cholesky(cov))      # L^-1: |L^-1 (v - mean)| is Mahalanobis
        self.shape = public.shape[1:]


def span_attack(rows: Tensor, prior: GaussianPrior) -> Tensor:
    """The most plausible secret in the span of ``rows`` (m, ...), one sample's shares and decoys.

    Every secret here is some ``sum a_i row_i``; the attack picks the ``a`` whose combination is
    nearest the prior mean in the prior's Mahalanobis distance (least squares after whitening).
    With ``m >= D`` independent rows it returns the prior mean: the span says nothing. Run it on
    the plain tensor (one row) and it returns that tensor rescaled towards the prior.
    """
    rows = validate.finite(validate.tensor(rows, "rows", min_dim=2), "rows")
    s = rows.detach().double().reshape(len(rows), -1)                     # (m, D)
    if s.shape[1] != len(prior.mean):
        raise ValueError(f"rows hold {s.shape[1]} values each, the prior {len(prior.mean)}")
    a = torch.linalg.lstsq(prior.whiten @ s.T, (prior.whiten @ prior.mean)[:, None]).solution
    return (s.T @ a)[:, 0].reshape(prior.shape).to(rows.dtype)


def decoy_sweep(secrets: Tensor, records: Tensor, prior: GaussianPrior, decoys: Sequence[int], *,
                n_shares: int = 2, generator: torch.Generator | None = None) -> pd.DataFrame:
    """Cost and leakage of set-up (i) per decoy count, beside the plain computation (first row).

    For each count: the inner products of ``secrets`` (B, D) with ``records`` (K, D) through a
    Wire (bytes up and down, seconds), then :func:`span_attack` on each secret's rows sent alone
    (the grouping known: the worst case) scored against the truth: MSE and PSNR on data in [0, 1],
    and cosine similarity. The plain row is the server reading ``x`` itself (``n_decoys`` missing).
    One row per setting, ready for seaborn.
    """
    secrets = validate.finite(validate.tensor(secrets, "secrets", min_dim=2), "secrets")
    flat = secrets.reshape(len(secrets), -1)

    def row(name, d, estimates, wire, seconds):
        led = wire.ledger().groupby("kind").bytes.sum()
        return {"defense": name, "n_decoys": d, "rows_per_sample": 1 if d is None else n_shares + d,
                "bytes_up": int(led.drop("results", errors="ignore").sum()), "bytes_down": int(led.get("results", 0)),
                "seconds": seconds, "attack_mse": float(metrics.mse(estimates[:, None, None], flat[:, None, None]).mean()),
                "attack_psnr": float(metrics.psnr(estimates[:, None, None], flat[:, None, None]).mean()),
                "attack_cosine": float(torch.nn.functional.cosine_similarity(estimates, flat).mean())}

    wire = Wire()
    start = time.perf_counter()
    got = wire.send(flat, sender="client", receiver="server", kind="activations")
    wire.send(got @ records.T.to(got.dtype), sender="server", receiver="client", kind="results")
    rows = [row("plain", None, flat, wire, time.perf_counter() - start)]
    for d in decoys:
        splinter, wire = Splinter(n_shares, d, generator=generator), Wire()
        start = time.perf_counter()
        inner_products(flat, records, splinter=splinter, wire=wire)
        seconds = time.perf_counter() - start
        estimates = torch.stack([span_attack(splinter.split(x[None])[0], prior) for x in flat])
        rows.append(row("splintering", d, estimates.reshape(len(flat), -1), wire, seconds))
    frame = pd.DataFrame(rows)
    return frame.astype({"n_decoys": "Int64"})
