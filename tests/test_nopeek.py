"""NoPeek (Vepakomma et al., 2020): the term is alpha * dCor, it trains like the unsplit objective
with the term, it lowers dCor at the cut as alpha grows, in every split configuration."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defenses import NoPeek, NoPeekLoss
from toolkit import data, metrics
from toolkit.split import SplitConfig, SplitNN

SGD = SplitConfig(lr=0.1, batch_size=64, shuffle=False, record=False)
ADAM = SplitConfig(optimizer="adam", lr=3e-3, batch_size=64, record=False)


@pytest.fixture(scope="module")
def small(digits):
    return digits.subset(range(512))


def encoder(d_in=64, d_out=32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(1), nn.Linear(d_in, d_out), nn.Tanh())


def head(d_in=32, d_out=10, seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out))


@torch.no_grad()
def cut_dcor(part, x):
    """dCor between held-out inputs and the party's cut-layer outputs (what would cross)."""
    part.eval()
    out = metrics.distance_correlation_chunked(x, part(x))
    part.train()
    return float(out)


def test_the_term_is_alpha_times_distance_correlation_with_its_gradient():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 8, 8, generator=g)
    layer = encoder(seed=2)
    z = layer(x)
    term = NoPeekLoss(2.5)(x, z)
    ref = distance_correlation_and_grad(x, layer)
    term.backward()
    assert float(term.detach()) == pytest.approx(2.5 * ref[0], rel=1e-12)
    assert torch.allclose(layer[1].weight.grad, 2.5 * ref[1], rtol=1e-5, atol=1e-7)  # float32 gradients
    assert float(NoPeekLoss(0.0)(x, z).detach()) == 0.0 and "alpha=2.5" in repr(NoPeekLoss(2.5))


def distance_correlation_and_grad(x, layer):
    twin = copy.deepcopy(layer)
    d = metrics.distance_correlation(x, twin(x))
    d.backward()
    return float(d.detach()), twin[1].weight.grad


@pytest.mark.parametrize("bad", [-0.1, -1, float("nan"), float("inf"), "1", True, None])
def test_a_negative_or_non_numeric_alpha_is_refused(bad):
    with pytest.raises(ValueError, match="alpha must be a non-negative number"):
        NoPeekLoss(bad)
    with pytest.raises(ValueError, match="alpha must be a non-negative number"):
        NoPeek(bad)
    with pytest.raises(ValueError, match="column must be a non-empty string"):
        NoPeek(1.0, column="")


def test_a_step_with_nopeek_equals_the_unsplit_objective_with_the_term(small):
    client, server = encoder(), head()
    ref_c, ref_s = copy.deepcopy(client), copy.deepcopy(server)
    hook = NoPeek(3.0)
    history = SplitNN.vanilla(client, server, small, config=SGD, hooks={"client": hook}).fit(steps=2)
    logged = []
    for k in range(2):
        x, y = small.x_train[64 * k:64 * (k + 1)], small.y_train[64 * k:64 * (k + 1)]
        z = ref_c(x)
        dcor = metrics.distance_correlation(x, z)
        logged.append(float(dcor.detach()))
        (F.cross_entropy(ref_s(z), y) + 3.0 * dcor).backward()
        with torch.no_grad():
            for p in [*ref_c.parameters(), *ref_s.parameters()]:
                p -= 0.1 * p.grad
                p.grad = None
    for a, b in zip([*client.parameters(), *server.parameters()], [*ref_c.parameters(), *ref_s.parameters()]):
        assert torch.allclose(a, b, atol=1e-6)
    assert history["dcor"].tolist() == pytest.approx(logged, rel=1e-6)  # the batch's dCor before its step


def test_alpha_zero_adds_nothing_and_still_logs_dcor(small):
    client, server = encoder(), head()
    plain_c, plain_s = copy.deepcopy(client), copy.deepcopy(server)
    history = SplitNN.vanilla(client, server, small, config=SGD, hooks={"client": NoPeek(0.0)}).fit(steps=3)
    SplitNN.vanilla(plain_c, plain_s, small, config=SGD).fit(steps=3)
    assert all(torch.equal(a, b) for a, b in zip(client.parameters(), plain_c.parameters()))
    assert history["dcor"].between(0.5, 1).all()


def test_dcor_at_the_cut_falls_as_alpha_grows_and_accuracy_holds(digits):
    rows = {}
    for alpha in (0.0, 1.0, 4.0):
        client, server = encoder(), head()
        sl = SplitNN.vanilla(client, server, digits, config=ADAM, hooks={"client": NoPeek(alpha)})
        sl.fit(epochs=4)
        rows[alpha] = (cut_dcor(client, digits.x_test), sl.evaluate()["accuracy"])
    dcor = [rows[a][0] for a in (0.0, 1.0, 4.0)]
    assert dcor[0] > dcor[1] > dcor[2] and dcor[2] < dcor[0] - 0.2, rows
    assert rows[1.0][1] > rows[0.0][1] - 0.05 and rows[0.0][1] > 0.85, rows


def _with_and_without(build, part, x, alpha=5.0, epochs=2):
    """dCor at ``part``'s cut after training with NoPeek(alpha) and without, from the same start."""
    out = []
    for a in (0.0, alpha):
        fresh = copy.deepcopy(part)
        build(fresh, NoPeek(a)).fit(epochs=epochs)
        out.append(cut_dcor(fresh, x))
    return out


def test_nopeek_in_the_u_shaped_configuration(small):
    middle, tail = nn.Sequential(nn.Linear(32, 16), nn.Tanh()), nn.Linear(16, 10)

    def build(h, hook):
        return SplitNN.u_shaped(h, copy.deepcopy(middle), copy.deepcopy(tail), small, config=ADAM,
                                hooks={"client": hook})
    plain, defended = _with_and_without(build, encoder(), small.x_test)
    assert defended < plain - 0.15, (plain, defended)


def test_nopeek_in_the_multi_hop_configuration(small):
    hop, top = nn.Sequential(nn.Linear(32, 16), nn.Tanh()), nn.Linear(16, 10)

    def build(h, hook):
        return SplitNN.multi_hop([h, copy.deepcopy(hop), copy.deepcopy(top)], small, config=ADAM,
                                 hooks={"client": hook})
    plain, defended = _with_and_without(build, encoder(), small.x_test)
    assert defended < plain - 0.15, (plain, defended)


def test_nopeek_in_the_multi_task_configuration(small):
    heads = {"digit": head(), "parity": head(d_out=2)}

    def build(h, hook):
        return SplitNN.multi_task(h, copy.deepcopy(heads), small, targets={"parity": lambda y: y % 2},
                                  config=ADAM, hooks={"client": hook})
    plain, defended = _with_and_without(build, encoder(), small.x_test)
    assert defended < plain - 0.15, (plain, defended)


def test_nopeek_in_the_vertical_configuration_for_each_client(small):
    views = data.vertical_split(small, 2)
    widths = [v.x_train[0].numel() for v in views]
    dcor = {}
    for alpha in (0.0, 5.0):
        parts = [encoder(w, 16, seed=k) for k, w in enumerate(widths)]
        hooks = {f"client:{k}": NoPeek(alpha, column=f"dcor_{k}") for k in range(2)}
        history = SplitNN.vertical(parts, head(), views, config=ADAM, hooks=hooks).fit(epochs=2)
        assert {"dcor_0", "dcor_1"} <= set(history.columns)
        dcor[alpha] = [cut_dcor(p, v.x_test) for p, v in zip(parts, views)]
    assert all(d < p - 0.15 for p, d in zip(dcor[0.0], dcor[5.0])), dcor


def test_one_instance_for_several_parties_logs_their_mean(small):
    views = data.vertical_split(small, 2)
    hook = NoPeek(1.0)
    parts = [encoder(v.x_train[0].numel(), 16, seed=k) for k, v in enumerate(views)]
    history = SplitNN.vertical(parts, head(), views, config=SGD, hooks={"client:0": hook, "client:1": hook}).fit(steps=1)
    assert len(hook.values[1]) == 2
    assert float(history["dcor"].iloc[0]) == pytest.approx(sum(hook.values[1]) / 2)
