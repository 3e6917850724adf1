"""Label defenses (Li et al., ICLR 2022): the perturbed gradient is what crosses and what the client
trains on; same seed, same numbers; max-norm equalizes expected norms; Marvell's noise solves its
sum-KL problem, spends its power budget and defeats the norm attack on a rare-positive batch."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from attacks.label_leakage import NormAttack, per_batch_auc
from defenses import IsotropicNoise, Marvell, MaxNorm
from defenses.labels import solve_marvell, sum_kl
from toolkit import data, metrics, models
from toolkit.split import SplitConfig, SplitNN
from toolkit.wire import Transfer

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = SplitConfig(batch_size=64, lr=0.1, shuffle=False)
DEFENSES = {
    "isotropic": lambda gen: IsotropicNoise(0.5, relative=True, generator=gen),
    "max_norm": lambda gen: MaxNorm(generator=gen),
    "max_norm_isotropic": lambda gen: MaxNorm(mode="isotropic", generator=gen),
    "marvell": lambda gen: Marvell(2.0, generator=gen),
}


@pytest.fixture(scope="module")
def loan():
    return data.load("loan", positive_rate=0.1, n_samples=1000, seed=0)


def _parts(ds):
    torch.manual_seed(0)
    return models.cut(models.tabular_mlp(ds.shape[0], 2), at="act1")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", DEFENSES)
def test_the_perturbed_gradient_crosses_and_the_client_trains_on_it(loan, name):
    client, server = _parts(loan)
    twin, honest = copy.deepcopy(client), copy.deepcopy(server)
    sl = SplitNN.vanilla(client, server, loan, labels="server", config=CFG, hooks={"server": DEFENSES[name](_gen())})
    history = sl.fit(steps=1)
    x, y = loan.x_train[:64], loan.y_train[:64]
    z = twin(x)
    leaf = z.detach().requires_grad_()
    F.cross_entropy(honest(leaf), y).backward()
    expected = DEFENSES[name](_gen()).gradients(1, leaf.grad, y)  # the same defense, the same stream
    got = sl.wire.observed(by="client", kind="gradients")[0].tensor
    assert torch.allclose(got, expected, atol=1e-7)
    assert not torch.allclose(got, leaf.grad, atol=1e-4)  # the true gradient never crossed
    assert history["noise_power"][0] == pytest.approx(float((got - leaf.grad).square().sum(1).mean()), rel=1e-4)
    z.backward(got)  # the client stepped on what it received
    (w,), (trained,) = [[p for p in m.parameters() if p.dim() == 2] for m in (twin, client)]
    assert torch.allclose(trained, w - 0.1 * w.grad, atol=1e-6)


@pytest.mark.parametrize("name", DEFENSES)
def test_same_seed_same_numbers(loan, name):
    def transcript(seed):
        client, server = _parts(loan)
        sl = SplitNN.vanilla(client, server, loan, labels="server", config=CFG,
                             hooks={"server": DEFENSES[name](_gen(seed))})
        sl.fit(steps=3)
        return torch.cat([t.tensor for t in sl.wire.observed(by="client", kind="gradients")])

    a, b, c = transcript(1), transcript(1), transcript(2)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def _rare_batch(n=200, n_pos=10, d=16, seed=0):
    """A batch like a trained model's: positives' gradients large along w, negatives' small and opposite."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    y = torch.zeros(n, dtype=torch.long)
    y[:n_pos] = 1
    scale = torch.where(y == 1, 0.9, -0.05)[:, None]  # (B, 1): p - y for a confident "negative" model
    grads = scale * (w + 0.3 * torch.randn(n, d, generator=g))
    return grads, y


@pytest.mark.parametrize("mode", ["scalar", "isotropic"])
def test_max_norm_equalizes_expected_squared_norms(mode):
    grads, y = _rare_batch()
    grads[5] *= 3.0  # one large positive sets the target
    target = float(grads.square().sum(1).max())
    defense = MaxNorm(mode=mode, generator=_gen(3))
    draws = torch.stack([defense.gradients(k, grads, None) for k in range(4000)])  # (draws, B, d)
    mean_sq = draws.square().sum(2).mean(0)  # (B,) Monte-Carlo E|g~_i|^2
    assert mean_sq.max() / target == pytest.approx(1.0, abs=0.08)  # worst row; sd ~2 % per row here
    assert mean_sq.min() / target == pytest.approx(1.0, abs=0.08)
    assert float(grads.square().sum(1).min()) / target < 0.01  # before: a hundredfold spread
    if mode == "scalar":  # along the row's own direction, its sign flipped with probability Phi(-1/sigma_i)
        cos = F.cosine_similarity(draws[0], grads, dim=1).abs()
        assert torch.allclose(cos, torch.ones_like(cos), atol=1e-4)
        sigma = (target / grads.square().sum(1) - 1).sqrt()  # (B,)
        flipped = ((draws * grads).sum(2) < 0).double().mean(0)  # (B,)
        phi = torch.distributions.Normal(0.0, 1.0).cdf(-1 / sigma).double()
        assert torch.allclose(flipped, phi, atol=0.03)  # 4000 draws: sd <= 0.008
        zero = grads.clone()
        zero[7] = 0.0
        assert torch.equal(defense.gradients(1, zero, None)[7], torch.zeros(16))  # a zero row stays zero


def test_isotropic_noise_has_the_stated_std():
    grads, _ = _rare_batch(d=64)
    top = float(grads.norm(dim=1).max())
    noise = torch.cat([IsotropicNoise(2.0, relative=True, generator=_gen(k)).gradients(1, grads, None) - grads
                       for k in range(20)])
    assert float(noise.std()) == pytest.approx(2.0 * top / 8.0, rel=0.03)  # sqrt(d) = 8
    absolute = IsotropicNoise(0.1, generator=_gen()).gradients(1, grads, None) - grads
    assert float(absolute.std()) == pytest.approx(0.1, rel=0.05)
    assert torch.equal(IsotropicNoise(0.0).gradients(1, grads, None), grads)


def test_sum_kl_is_the_symmetric_kl_of_the_gaussians_it_models():
    d, u, v = 3, 0.4, 1.3
    m0, m1 = torch.zeros(d, dtype=torch.float64), torch.tensor([1.5, -0.5, 0.2], dtype=torch.float64)
    e = (m1 - m0) / (m1 - m0).norm()
    lam10, lam20, lam11, lam21 = 0.7, 0.2, 2.0, 0.5
    eye = torch.eye(d, dtype=torch.float64)
    cov0 = u * eye + lam20 * eye + (lam10 - lam20) * torch.outer(e, e)
    cov1 = v * eye + lam21 * eye + (lam11 - lam21) * torch.outer(e, e)
    p0 = torch.distributions.MultivariateNormal(m0, cov0)
    p1 = torch.distributions.MultivariateNormal(m1, cov1)
    ref = torch.distributions.kl_divergence(p1, p0) + torch.distributions.kl_divergence(p0, p1)
    got = sum_kl(lam10, lam20, lam11, lam21, u=u, v=v, d=d, g=float((m1 - m0).square().sum()))
    assert got == pytest.approx(float(ref), rel=1e-10)


def _authors_zero_uv(g, p, P):
    """Li et al.'s closed form for u = v = 0 (solver.py, solve_zero_uv), case A: (lam10, lam11)."""
    e = math.sqrt((P + (1 - p) * g) / (P + p * g))
    tau = (P / p) / (e + (1 - p) / p)
    return tau, P / p - (1 - p) * tau / p


@pytest.mark.parametrize("p,power", [(0.01, 0.5), (0.1, 2.0), (0.3, 10.0)])
def test_marvell_solver_matches_the_authors_closed_form_without_gradient_noise(p, power):
    lam10, lam20, lam11, lam21, kl = solve_marvell(u=0.0, v=0.0, d=16, g=2.0, p=p, power=power)
    ref10, ref11 = _authors_zero_uv(2.0, p, power * 2.0)
    assert (lam10, lam11) == pytest.approx((ref10, ref11), rel=1e-5)
    assert lam20 == lam21 == 0.0
    assert kl == pytest.approx(sum_kl(ref10, 0, ref11, 0, u=0.0, v=0.0, d=16, g=2.0), rel=1e-9)


@pytest.mark.parametrize("u,v", [(0.2, 1.0), (1.0, 0.2), (0.5, 0.0)])
def test_no_feasible_point_beats_the_marvell_solver(u, v):
    d, g, p, power = 8, 3.0, 0.05, 1.5
    *lam, kl = solve_marvell(u=u, v=v, d=d, g=g, p=p, power=power)
    assert (*lam, kl) == solve_marvell(u=u, v=v, d=d, g=g, p=p, power=power)  # deterministic
    assert (lam[3] if u <= v else lam[1]) == 0.0  # orthogonal noise only on the smaller-variance class
    spent = p * (lam[2] + (d - 1) * lam[3]) + (1 - p) * (lam[0] + (d - 1) * lam[1])
    assert spent == pytest.approx(power * g, rel=1e-6)  # the whole budget
    assert lam[1] <= lam[0] and lam[3] <= lam[2]
    gen = _gen(5)
    w = torch.rand(3000, 4, generator=gen, dtype=torch.float64)
    w[:, 1] *= w[:, 0]  # lam20 <= lam10
    w[:, 3] *= w[:, 2]  # lam21 <= lam11
    cost = p * (w[:, 2] + (d - 1) * w[:, 3]) + (1 - p) * (w[:, 0] + (d - 1) * w[:, 1])
    w *= (power * g / cost)[:, None]  # random points on the budget boundary
    best_random = min(sum_kl(*map(float, x), u=u, v=v, d=d, g=g) for x in w)
    assert kl <= best_random + 1e-9


def test_marvell_spends_its_power_and_defeats_the_norm_attack_on_a_rare_positive_batch():
    grads, y = _rare_batch()
    gap = float((grads[y == 1].mean(0) - grads[y == 0].mean(0)).square().sum())
    truth = {k: y for k in range(1, 101)}

    def norm_auc(hook):
        seen = [Transfer(k, "server", "client", "gradients", hook.gradients(k, grads, y) if hook else grads)
                for k in range(1, 101)]
        return sum(per_batch_auc(NormAttack().run(seen), truth)) / 100

    assert norm_auc(None) == 1.0
    weak, strong = Marvell(0.5, generator=_gen(1)), Marvell(4.0, generator=_gen(1))
    auc_weak, auc_strong = norm_auc(weak), norm_auc(strong)
    assert auc_strong < auc_weak < 1.0
    assert auc_strong < 0.7
    power = sum(strong.record(k)["noise_power"] for k in range(1, 101)) / 100
    assert power == pytest.approx(4.0 * gap, rel=0.05)  # E|noise|^2 = P = power * |m1 - m0|^2
    assert strong.record(1)["sumkl"] < weak.record(1)["sumkl"]
    assert 0 < weak.record(1)["error_bound"] < strong.record(1)["error_bound"] < 0.5
    assert strong.record(1)["error_bound"] == 0.5 - math.sqrt(strong.record(1)["sumkl"]) / 4


def test_marvell_with_one_class_uses_the_last_seen_statistics():
    grads, y = _rare_batch()
    m = Marvell(1.0, generator=_gen())
    negatives = grads[y == 0][:64]
    first = m.gradients(1, negatives, torch.zeros(64, dtype=torch.long))
    assert torch.equal(first, negatives)  # no positive seen yet: nothing to shape the noise on
    m.gradients(2, grads, y)
    later = m.gradients(3, negatives, torch.zeros(64, dtype=torch.long))
    assert not torch.allclose(later, negatives) and math.isfinite(m.record(3)["sumkl"])


def test_bad_input_is_refused_and_changes_nothing():
    with pytest.raises(ValueError, match="sigma must be a non-negative number, got -1"):
        IsotropicNoise(-1.0)
    with pytest.raises(ValueError, match="power must be a non-negative number, got -0.5"):
        Marvell(-0.5)
    with pytest.raises(ValueError, match="power must be a non-negative number"):
        Marvell(float("nan"))
    with pytest.raises(ValueError, match="relative must be True or False"):
        IsotropicNoise(1.0, relative=1)
    with pytest.raises(ValueError, match="mode must be one of"):
        MaxNorm(mode="perp")
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        Marvell(1.0, generator=0)
    grads, y = _rare_batch()
    m = Marvell(1.0, generator=_gen())
    m.gradients(1, grads, y)
    before = (dict(m.values), dict(m._stats), list(m._counts))
    with pytest.raises(ValueError, match="Marvell needs the labels"):
        m.gradients(2, grads, None)
    bad = y.clone()
    bad[3] = 2
    with pytest.raises(ValueError, match="label 2 at index 3, but there are only 2 classes"):
        m.gradients(2, grads, bad)
    with pytest.raises(ValueError, match="holds 199 labels for 200 samples"):
        m.gradients(2, grads, y[1:])
    assert (dict(m.values), dict(m._stats), list(m._counts)) == before


def test_the_defenses_run_in_a_split_fit_and_log_their_columns(loan):
    client, server = _parts(loan)
    sl = SplitNN.vanilla(client, server, loan, labels="server", config=CFG,
                         hooks={"server": Marvell(1.0, generator=_gen())})
    history = sl.fit(epochs=5)
    assert {"noise_power", "sumkl", "error_bound"} <= set(history.columns)
    assert (history["noise_power"] > 0).all() and history["sumkl"].notna().all()
    prob = server(client(loan.x_test)).softmax(1)[:, 1].detach()
    assert metrics.auc(prob, loan.y_test) > 0.85  # the task still learns through the noise (measured 0.948;
    # 0.945 without the defense)
