"""DP-SGD through our Opacus wrapper (a party's local training, a split-learning party): epsilon
equals Opacus's own, noise off is exactly per-sample clipping, bad input changes nothing, same seed
gives the same weights (the local Gaussian mechanism: tests/test_dp_local.py)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from toolkit.accounting import epsilon as accounted
from defenses.dp import make_private
from defenses.dp_split import private_party
from toolkit import models
from toolkit.split import SplitConfig, SplitNN

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # torch's note on Opacus's backward hook at a first layer fed raw data; Opacus's secure-RNG note;
              # RDP's note that its best order sits at an end of its grid: expected, not findings
              pytest.mark.filterwarnings("ignore:Full backward hook is firing", "ignore:Secure RNG turned off",
                                         "ignore:Optimal order is the")]


def mlp(seed=0):
    torch.manual_seed(seed)
    return models.mlp([64, 32, 10])


def loader(ds, batch_size=64, n=None):
    n = n or len(ds.y_train)
    return DataLoader(TensorDataset(ds.x_train[:n], ds.y_train[:n]), batch_size=batch_size)


def private(net, ds, *, noise=1.0, seed=0, lr=0.1, **kw):
    return make_private(net, torch.optim.SGD(net.parameters(), lr=lr), loader(ds, **kw), noise_multiplier=noise,
                        max_grad_norm=1.0, generator=torch.Generator().manual_seed(seed))


# -- make_private: epsilon, training, exactness -----------------------------------------------------
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_wrapper_epsilon_equals_opacus_own_for_the_same_run(digits, accountant):
    net = mlp()
    dp = make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), loader(digits), noise_multiplier=1.1,
                      max_grad_norm=1.0, generator=torch.Generator().manual_seed(0), accountant=accountant)
    dp.fit(epochs=2)
    assert dp.accountant.steps == 2 * len(dp.data_loader) == 46
    assert dp.epsilon() == pytest.approx(dp.engine.get_epsilon(1e-5), rel=1e-9)  # the engine's accountant by default
    assert dp.epsilon(1e-6, accountant=accountant) == pytest.approx(dp.engine.get_epsilon(1e-6), rel=1e-9)
    assert dp.epsilon(accountant=accountant) == pytest.approx(
        accounted(noise_multiplier=1.1, sample_rate=1 / 23, steps=46, delta=1e-5, accountant=accountant), rel=1e-9)


def test_opacus_golden_values_through_our_wrapper():
    """Sigma 1.5, sample rate 0.04 (25 batches), 2,250 steps (90 epochs), delta 1e-5: 7.3291 (RDP);
    PRV 6.7791 at 2,250 steps (Opacus's 6.7774 is at 2,249, see test_accounting); target 8 -> 1.416."""
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(100, 2, generator=g), torch.randint(0, 2, (100,), generator=g))
    net = nn.Linear(2, 2)
    dp = make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), DataLoader(ds, batch_size=4),
                      noise_multiplier=1.5, max_grad_norm=1.0, generator=torch.Generator().manual_seed(1))
    assert dp.sample_rate == 0.04
    for _ in range(90):
        for x, y in dp.data_loader:
            dp.optimizer.zero_grad()
            F.cross_entropy(dp.module(x), y).backward()
            dp.optimizer.step()
    assert dp.accountant.steps == 2250
    assert dp.epsilon() == pytest.approx(7.3291, abs=1e-3) == dp.engine.get_epsilon(1e-5)
    assert dp.epsilon(accountant="prv") == pytest.approx(6.7791, abs=1e-3)
    net = nn.Linear(2, 2)
    targeted = make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), DataLoader(ds, batch_size=4),
                            target_epsilon=8, epochs=90, max_grad_norm=1.0)
    assert targeted.noise_multiplier == pytest.approx(1.416, abs=1e-3)
    assert targeted.optimizer.noise_multiplier == targeted.noise_multiplier


def test_make_private_trains_a_digits_mlp_and_reports_epsilon_and_delta_in_its_history(digits):
    dp = private(mlp(), digits, noise=1.0)
    history = dp.fit(epochs=4, test=(digits.x_test, digits.y_test))
    assert list(history.columns) == ["epoch", "loss", "accuracy", "epsilon_rdp", "epsilon_prv", "delta",
                                     "test_loss", "test_accuracy"]
    assert history["epoch"].tolist() == [1, 2, 3, 4]
    assert history["test_accuracy"].iloc[-1] > 0.6  # chance is 0.1
    assert (history["delta"] == 1e-5).all()
    assert history["epsilon_rdp"].is_monotonic_increasing and history["epsilon_prv"].is_monotonic_increasing
    assert history["epsilon_rdp"].iloc[-1] == pytest.approx(dp.epsilon()) == pytest.approx(dp.engine.get_epsilon(1e-5))
    assert 0 < history["epsilon_prv"].iloc[-1] < history["epsilon_rdp"].iloc[-1]  # PRV is the tighter bound


def clipped_mean(parts, loss_of, x, y, *, max_grad_norm):
    """Per-sample gradients of ``loss_of(x_i, y_i)`` with respect to the parameters of ``parts``,
    each clipped over all of them as Opacus does (factor c / (norm + 1e-6), at most 1), averaged."""
    params = [p for part in parts for p in part.parameters()]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        grads = torch.autograd.grad(loss_of(x[i:i + 1], y[i:i + 1]), params)
        norm = torch.cat([g.flatten() for g in grads]).norm()
        total = [t + (max_grad_norm / (norm + 1e-6)).clamp(max=1.0) * g for t, g in zip(total, grads)]
    return params, [t / len(x) for t in total]


def test_noise_off_gives_exactly_opacus_clipped_gradients(digits):
    x, y = digits.x_train[:32], digits.y_train[:32]
    ours, theirs, ref = mlp(), mlp(), mlp()
    one_batch = DataLoader(TensorDataset(x, y), batch_size=32)
    dp = make_private(ours, torch.optim.SGD(ours.parameters(), lr=1.0), one_batch, noise_multiplier=0.0,
                      max_grad_norm=0.5, poisson_sampling=False, generator=torch.Generator().manual_seed(0))
    module, opt, _ = PrivacyEngine(accountant="rdp").make_private(
        module=theirs, optimizer=torch.optim.SGD(theirs.parameters(), lr=1.0), data_loader=one_batch,
        noise_multiplier=0.0, max_grad_norm=0.5, poisson_sampling=False)
    params, step = clipped_mean([ref], lambda a, b: F.cross_entropy(ref(a), b), x, y, max_grad_norm=0.5)
    expected = [p.detach() - g for p, g in zip(params, step)]  # one SGD step, lr 1
    for m, o in [(dp.module, dp.optimizer), (module, opt)]:
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()
    for a, b, c in zip(ours.parameters(), theirs.parameters(), expected):
        assert torch.equal(a, b)  # our wrapper is Opacus, bit for bit
        torch.testing.assert_close(a, c, atol=1e-6, rtol=0)
    assert dp.epsilon() == math.inf and dp.report()["epsilon_prv"] == math.inf  # no noise, no privacy


def test_same_generator_seed_same_weights(digits):
    runs = []
    for seed in (5, 5, 6):
        net = mlp()
        dp = make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), loader(digits, n=512), noise_multiplier=1.0,
                          max_grad_norm=1.0, generator=torch.Generator().manual_seed(seed), report=("rdp",))
        assert list(dp.fit(epochs=1).columns) == ["epoch", "loss", "accuracy", "epsilon_rdp", "delta"]
        runs.append(torch.cat([p.detach().flatten() for p in dp.module.parameters()]))
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


def _snapshot(net, opt):
    return (copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict()), type(opt),
            [len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in net.modules()],
            [hasattr(p, "grad_sample") for p in net.parameters()])


def _same(a, b):
    sa, oa, ta, ha, ga = a
    sb, ob, tb, hb, gb = b
    return (all(torch.equal(sa[k], sb[k]) for k in sa) and oa == ob and ta is tb and ha == hb and ga == gb)


@pytest.mark.parametrize("kwargs, build, match", [
    ({"noise_multiplier": 1.0}, lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16),
                                                      nn.ReLU(), nn.Linear(16, 10)), r"layer '2' \(BatchNorm1d\)"),
    ({"noise_multiplier": -0.5}, mlp, "noise_multiplier must be a non-negative number"),
    ({"target_epsilon": 1e-6, "epochs": 50}, mlp, "cannot be reached"),
    ({"target_epsilon": 1.0}, mlp, "epochs must be a positive int"),
    ({"noise_multiplier": 1.0, "target_epsilon": 1.0, "epochs": 1}, mlp, "not both"),
    ({"noise_multiplier": 1.0, "delta": 1.5}, mlp, "delta"),
    ({"noise_multiplier": 1.0, "accountant": "gdp"}, mlp, "unknown accountant"),
    ({"noise_multiplier": 1.0, "report": ()}, mlp, "report names the accountants"),
])
def test_bad_input_is_named_and_changes_nothing(digits, kwargs, build, match):
    net = build()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    before = _snapshot(net, opt)
    data = loader(digits)
    sampler = data.batch_sampler
    with pytest.raises(ValueError, match=match):
        make_private(net, opt, data, max_grad_norm=1.0, **kwargs)
    assert _same(before, _snapshot(net, opt)) and data.batch_sampler is sampler


# -- DP-SGD for a split-learning party -------------------------------------------------------------
def test_private_party_noise_off_clips_per_sample_gradients_like_the_unsplit_network(digits):
    """One step on one batch of 48: the client's new weights are the per-sample clipped step of the
    unsplit network (client part's parameters only); the server's are the plain SGD step."""
    small = digits.subset(torch.arange(48))
    net = mlp(3)
    ref_client, ref_server = models.cut(copy.deepcopy(net), at=3)
    client, server = models.cut(net, at=3)
    sl = SplitNN.vanilla(client, server, small, config=SplitConfig(lr=1.0, batch_size=48))
    party = private_party(sl, max_grad_norm=0.3, noise_multiplier=0.0)
    party.fit(1)
    x, y = small.x_train, small.y_train
    params, step = clipped_mean([ref_client], lambda a, b: F.cross_entropy(ref_server(ref_client(a)), b), x, y,
                                max_grad_norm=0.3)
    for p, ref, g in zip(client.parameters(), params, step):
        torch.testing.assert_close(p.detach(), ref.detach() - g, atol=1e-6, rtol=0)
    F.cross_entropy(ref_server(ref_client(x)), y).backward()
    for p, ref in zip(server.parameters(), ref_server.parameters()):
        torch.testing.assert_close(p.detach(), ref.detach() - ref.grad, atol=1e-6, rtol=0)
    assert party.epsilon() == math.inf


def test_private_u_shaped_client_clips_over_both_of_its_parts(digits):
    """The U-shaped client holds the first and the last layers: per-sample gradients from its own loss
    (last part) and from the gradient the server sent back (first part), clipped together."""
    small = digits.subset(torch.arange(40))
    torch.manual_seed(5)
    net = models.mlp([64, 32, 16, 10])  # flatten, fc1, act1, fc2, act2, fc3
    head, middle, tail = models.cut(net, at=[3, 5])
    refs = copy.deepcopy((head, middle, tail))
    sl = SplitNN.u_shaped(head, middle, tail, small, config=SplitConfig(lr=1.0, batch_size=40))
    private_party(sl, max_grad_norm=0.2, noise_multiplier=0.0).fit(1)
    r_head, r_middle, r_tail = refs
    params, step = clipped_mean([r_head, r_tail], lambda a, b: F.cross_entropy(r_tail(r_middle(r_head(a))), b),
                                small.x_train, small.y_train, max_grad_norm=0.2)
    for p, ref, g in zip([*head.parameters(), *tail.parameters()], params, step):
        torch.testing.assert_close(p.detach(), ref.detach() - g, atol=1e-6, rtol=0)


def test_private_party_trains_by_split_learning_and_reports_epsilon(digits):
    client, server = models.cut(mlp(1), at=3)
    sl = SplitNN.vanilla(client, server, digits, config=SplitConfig(lr=0.1, momentum=0.9, batch_size=64))
    party = private_party(sl, max_grad_norm=1.0, noise_multiplier=1.0, generator=torch.Generator().manual_seed(0))
    history = party.fit(3)
    assert sl.evaluate()["accuracy"] > 0.6
    steps = 3 * math.ceil(len(digits.y_train) / 64)
    assert party.accountant.steps == steps and len(history) == steps
    last = history.dropna(subset=["epsilon_rdp"])
    assert len(last) == 3 and last["epsilon_rdp"].is_monotonic_increasing and (last["delta"] == 1e-5).all()
    assert last["epsilon_rdp"].iloc[-1] == pytest.approx(
        accounted(noise_multiplier=1.0, sample_rate=64 / len(digits.y_train), steps=steps, delta=1e-5))
    assert sl.history["epsilon_rdp"].dropna().tolist() == last["epsilon_rdp"].tolist()


def test_private_party_with_a_budget_and_the_same_seed_repeats(digits):
    small = digits.subset(torch.arange(400))
    weights, noise = [], None
    for _ in range(2):
        client, server = models.cut(mlp(2), at=3)
        sl = SplitNN.vanilla(client, server, small, config=SplitConfig(lr=0.1, batch_size=40))
        budget = {"target_epsilon": 3.0, "epochs": 2} if noise is None else {"noise_multiplier": noise}
        party = private_party(sl, max_grad_norm=1.0, generator=torch.Generator().manual_seed(4), report=["rdp"], **budget)
        noise = party.noise_multiplier
        party.fit(2)
        weights.append(torch.cat([p.detach().flatten() for p in client.parameters()]))
        assert party.epsilon() == pytest.approx(3.0, abs=0.05) and party.epsilon() <= 3.0
    assert torch.equal(weights[0], weights[1])


@pytest.mark.parametrize("build, kwargs, match", [
    (lambda ds: SplitNN.vanilla(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16)),
                                nn.Linear(16, 10), ds), {}, "BatchNorm1d"),
    (lambda ds: SplitNN.vanilla(*models.cut(mlp(), at=3), ds), {"party": "hospital"}, "no party 'hospital'"),
    (lambda ds: SplitNN.vanilla(*models.cut(mlp(), at=3), ds, config=SplitConfig(shuffle=False)), {}, "shuffle"),
    (lambda ds: SplitNN.vanilla(*models.cut(mlp(), at=3), ds), {"noise_multiplier": -1.0}, "noise_multiplier"),
])
def test_private_party_refuses_bad_input_and_leaves_the_party_alone(digits, build, kwargs, match):
    sl = build(digits)
    opts = {p.name: p.optimizer for p in sl.parties}
    hooks = [len(m._forward_hooks) for p in sl.parties for mod in p.modules for m in mod.modules()]
    with pytest.raises(ValueError, match=match):
        private_party(sl, max_grad_norm=1.0, **{"noise_multiplier": 1.0, **kwargs})
    assert {p.name: p.optimizer for p in sl.parties} == opts
    assert [len(m._forward_hooks) for p in sl.parties for mod in p.modules for m in mod.modules()] == hooks


def test_wrap_optimizer_keeps_the_state_and_wraps_a_rebuilt_optimizer_too():
    from opacus.optimizers import DPOptimizer

    from toolkit.parties import Party, make_optimizer

    party = Party("client", optimizer=make_optimizer("sgd", lr=0.1, momentum=0.9))
    first = party.hold(nn.Linear(3, 2))
    first(torch.ones(4, 3)).sum().backward()
    party.step()
    plain = party.optimizer
    momentum = [plain.state[p]["momentum_buffer"].clone() for p in first.parameters()]
    wrapped = []
    party.wrap_optimizer(lambda opt: wrapped.append(opt) or DPOptimizer(opt, noise_multiplier=0.0, max_grad_norm=1.0,
                                                                       expected_batch_size=4))
    assert isinstance(party.optimizer, DPOptimizer) and wrapped == [plain]  # wrapped in place, state kept
    assert all(torch.equal(party.optimizer.state[p]["momentum_buffer"], m) for p, m in zip(first.parameters(), momentum))
    party.hold(nn.Linear(2, 2))  # a new part: the optimizer is rebuilt over every parameter, wrapped again
    assert isinstance(party.optimizer, DPOptimizer) and len(wrapped) == 2
    assert len(party.optimizer.params) == 4
    with pytest.raises(TypeError, match="callable"):
        party.wrap_optimizer("opacus")
