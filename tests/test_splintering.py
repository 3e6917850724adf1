"""Splintering: exact reassembly in the three set-ups, what an attacker who knows the scheme gets from
the shares against the plain tensor, bytes per decoy count, and bad input refused with nothing changed."""
import pytest
import torch
from torch import nn

from defenses.splintering import GaussianPrior, Splinter, check_linear, inner_products, outsource, span_attack, splintered
from defenses.splintering_split import SplinteredLayer, first_linear
from toolkit import audit, models
from toolkit.split import SplitConfig, SplitNN
from toolkit.wire import Wire


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- reassembly equals the direct computation ------------------------------------------------------
@pytest.mark.parametrize("k,d", [(2, 0), (3, 5), (2, 70)])
def test_inner_products_reassemble_exactly_and_the_server_sees_only_shuffled_rows(k, d):
    x, records = torch.randn(5, 64, generator=gen(1), dtype=torch.float64), torch.randn(30, 64, generator=gen(2),
                                                                                        dtype=torch.float64)
    wire = Wire()
    got = inner_products(x, records, splinter=Splinter(k, d, generator=gen()), wire=wire)
    assert torch.allclose(got, x @ records.T, rtol=0, atol=1e-10)
    (shares,) = wire.observed(by="server")
    assert shares.kind == "shares" and shares.tensor.shape == (5 * (k + d), 64)
    assert audit.find_rows(wire.observed(by="server"), x, atol=1e-6) == []
    assert [t.kind for t in wire.observed(by="client")] == ["results"]
    x32 = x.float()
    got32 = inner_products(x32, records.float(), splinter=Splinter(k, d, generator=gen()), wire=Wire())
    assert torch.allclose(got32, x32 @ records.float().T, atol=1e-4)


def test_outsourced_inverse_and_linear_operation_on_a_matrix_reassemble_exactly():
    m = torch.randn(3, 6, 6, generator=gen(1), dtype=torch.float64) + 3 * torch.eye(6, dtype=torch.float64)
    wire = Wire()
    inv = outsource(m, "inverse", splinter=Splinter(2, 4, generator=gen()), wire=wire)
    assert torch.allclose(inv, torch.linalg.inv(m), atol=1e-9)
    seen = wire.observed(by="server")[0].tensor
    assert seen.shape == (3 * 5, 6, 6) and audit.find_rows([wire.observed(by="server")[0]], m, atol=1e-6) == []
    b = torch.randn(6, 2, generator=gen(3), dtype=torch.float64)
    prod = outsource(m[0], lambda s: s @ b, splinter=Splinter(3, 2, generator=gen()), wire=Wire())
    assert torch.allclose(prod, m[0] @ b, atol=1e-10)


@pytest.mark.parametrize("layer,shape", [(nn.Linear(12, 5), (12,)), (nn.Conv2d(2, 3, 3, padding=1), (2, 5, 5))])
def test_first_layer_on_shares_equals_the_plain_layer_forward_and_backward(layer, shape):
    torch.manual_seed(0)
    server_part = nn.Sequential(layer, nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    z = torch.randn(6, *shape, generator=gen(1), requires_grad=True)
    plain = server_part(z)
    (plain_grad,) = torch.autograd.grad(plain.square().sum(), z)
    head, rest = first_linear(server_part)
    wire = Wire()
    wire.transforms.append(SplinteredLayer(head, Splinter(2, 3, generator=gen()), wire))
    sent, got = wire.transmit(z, sender="client", receiver="server", kind="activations")
    out = rest(got.requires_grad_())
    assert torch.allclose(out, plain, atol=1e-5)
    out.square().sum().backward()
    (grad,) = torch.autograd.grad(sent, z, got.grad)
    assert torch.allclose(grad, plain_grad, atol=1e-5)
    assert [t.kind for t in wire.observed(by="server")] == ["shares", "activations"]
    assert wire.observed(by="server", kind="shares")[0].tensor.shape == (6 * 5, *shape)
    assert layer.weight.grad is None  # W is not trained through the shares (module docstring)


def test_split_training_through_the_splintered_first_layer_learns_and_the_dry_run_sends_nothing(digits, one_thread):
    client, server = models.cut(models.mlp([64, 32, 16, 10]), at=3)
    head, rest = first_linear(server)
    wire = Wire()
    g = gen()
    wire.transforms.append(SplinteredLayer(head, Splinter(2, 4, generator=g), wire))
    state = g.get_state()
    sl = SplitNN.vanilla(client, rest, digits, wire=wire, config=SplitConfig(lr=0.05, optimizer="adam"))
    assert len(wire) == 0 and torch.equal(g.get_state(), state)  # the shape check ran on copies
    sl.fit(epochs=3)
    assert sl.evaluate()["accuracy"] > 0.8
    kinds = set(wire.ledger().kind)
    assert kinds == {"shares", "results", "activations", "gradients", "labels"}
    assert audit.find_rows(wire.observed(by="server"), digits.x_train.flatten(1), atol=1e-5) == []


# -- same seed, same shares ------------------------------------------------------------------------
def test_same_seed_same_shares_and_another_seed_other_shares():
    x = torch.randn(4, 10, generator=gen(5))
    a, sa = Splinter(3, 2, generator=gen(7)).split(x)
    b, sb = Splinter(3, 2, generator=gen(7)).split(x)
    c, _ = Splinter(3, 2, generator=gen(8)).split(x)
    assert torch.equal(a, b) and torch.equal(sa.weight, sb.weight) and torch.equal(sa.owner, sb.owner)
    assert not torch.allclose(a, c)


# -- what the server can estimate from what it sees -----------------------------------------------
@pytest.fixture(scope="module")
def digit_prior(digits):
    return GaussianPrior(digits.x_train.flatten(1)), digits.x_test.flatten(1)[:40]


def _attack_mse(prior, secrets, splinter):
    est = torch.stack([span_attack(splinter.split(x[None])[0], prior) for x in secrets])
    return float(((est.clamp(0, 1) - secrets) ** 2).mean()), float(torch.nn.functional.cosine_similarity(
        est, secrets).mean())


def test_shares_spanning_the_space_leave_the_attacker_at_the_prior_while_fewer_leak_the_direction(digit_prior):
    prior, secrets = digit_prior
    baseline = float(((prior.mean.float() - secrets) ** 2).mean())          # knows only the prior: 0.076
    plain = float(((span_attack(secrets[:1], prior) - secrets[:1]) ** 2).mean())
    assert plain < baseline  # the attack reads a plain tensor (the plain attacker: the tensor itself, error 0)
    full, _ = _attack_mse(prior, secrets, Splinter(2, 62, generator=gen()))  # 64 rows for 64 pixels
    assert full == pytest.approx(baseline, rel=1e-3) and full > 0.07
    few, cosine = _attack_mse(prior, secrets, Splinter(2, 8, generator=gen()))
    assert few < 0.5 * baseline and cosine > 0.99  # the documented leak: x lies in the span of 10 rows
    assert cosine > float(torch.nn.functional.cosine_similarity(prior.mean.float()[None], secrets).mean()) + 0.1


def test_masked_inverse_hides_the_matrix_from_the_best_linear_estimate():
    """The server, knowing the scheme, fits the best linear map from what it sees to M on its own
    simulations; on the masked matrices it explains almost nothing (R^2 near 0), on plain ones all."""
    n, trials = 3, 600
    def view(seed):
        g = gen(seed)
        ms = torch.randn(trials, n, n, generator=g, dtype=torch.float64) + 2 * torch.eye(n, dtype=torch.float64)
        wire = Wire()
        outsource(ms, "inverse", splinter=Splinter(2, 0, generator=g), wire=wire)
        return wire.observed(by="server")[0].tensor.reshape(trials, -1), ms.reshape(trials, -1)
    (a_fit, m_fit), (a_test, m_test) = view(1), view(2)
    def r2(features, target, f_test, t_test):
        f1 = torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype)], 1)
        w = torch.linalg.lstsq(f1, target).solution
        pred = torch.cat([f_test, torch.ones(len(f_test), 1, dtype=f_test.dtype)], 1) @ w
        return 1 - float(((pred - t_test) ** 2).sum() / ((t_test - t_test.mean(0)) ** 2).sum())
    assert r2(a_fit, m_fit, a_test, m_test) < 0.05
    assert r2(m_fit, m_fit, m_test, m_test) > 0.999


def test_client_learns_the_database_when_its_rows_span_the_space():
    """Set-up (i)'s other side (module docstring): with n_shares + n_decoys >= D the client's results
    and the rows it sent give every record exactly."""
    x, records = torch.randn(1, 8, generator=gen(1), dtype=torch.float64), torch.randn(5, 8, generator=gen(2),
                                                                                        dtype=torch.float64)
    wire = Wire()
    inner_products(x, records, splinter=Splinter(2, 6, generator=gen()), wire=wire)
    sent, results = wire.observed(by="server")[0].tensor, wire.observed(by="client")[0].tensor  # (8, 8), (8, 5)
    assert torch.allclose(torch.linalg.solve(sent, results).T, records, atol=1e-8)


def test_the_server_recovers_z_from_wz_when_its_first_layer_is_injective():
    z = torch.randn(20, 8, generator=gen(1))
    def recovered(out_features):
        layer = nn.Linear(8, out_features)
        wire = Wire()
        wire.transforms.append(SplinteredLayer(nn.Sequential(layer), Splinter(2, 6, generator=gen()), wire))
        wz = wire.send(z, sender="client", receiver="server", kind="activations")
        estimate = wz @ torch.linalg.pinv(layer.weight.detach()).T
        return float((estimate - z).square().mean() / z.square().mean())
    assert recovered(16) < 1e-8          # injective W: z exactly, splintering hides nothing here
    assert recovered(4) > 0.3            # 4 outputs for 8 values: the null space stays hidden


# -- cost --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [0, 3, 10])
def test_bytes_grow_with_the_rows_per_sample(d):
    wire = Wire()
    inner_products(torch.randn(4, 16, generator=gen(1)), torch.randn(7, 16, generator=gen(2)),
                   splinter=Splinter(2, d, generator=gen()), wire=wire)
    led = wire.ledger().set_index("kind").bytes
    assert led["shares"] == 4 * (2 + d) * 16 * 4 and led["results"] == 4 * (2 + d) * 7 * 4


# -- bad input: a ValueError naming the problem, nothing changed -----------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"n_shares": 1}, "n_shares must be at least 2"), ({"n_shares": 0}, "n_shares must be a positive int"),
    ({"n_shares": 2.5}, "n_shares"), ({"n_shares": True}, "n_shares"),
    ({"n_decoys": -1}, "n_decoys must be a non-negative int"), ({"scale": 0.0}, "scale must be a positive"),
])
def test_bad_splinter_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Splinter(**kwargs)


@pytest.mark.parametrize("op,match", [
    (torch.exp, "not linear: f\\(0\\) is not 0"), (torch.relu, "not linear: f\\(a x"),
    (lambda s: s @ torch.ones(4, 2) + 1.0, "f\\(0\\) is not 0"), (lambda s: s - s.mean(0), "mixes the rows"),
    (lambda s: s[:1], "one result row per input row"), ("not callable", "must be a callable"),
])
def test_an_operation_that_is_not_linear_is_refused_before_anything_is_drawn_or_sent(op, match):
    g, wire = gen(), Wire()
    state = g.get_state()
    with pytest.raises(ValueError, match=match):
        splintered(torch.randn(3, 4), op, splinter=Splinter(2, 1, generator=g), wire=wire)
    assert len(wire) == 0 and torch.equal(g.get_state(), state)
    check_linear(lambda s: 3 * s.flip(-1), torch.zeros(1, 4))  # a linear row-wise map passes


@pytest.mark.parametrize("matrix,op,match", [
    (torch.ones(3, 3), "inverse", "singular"), (torch.ones(2, 3), "inverse", "square"),
    (torch.eye(3), "exp", "not linear: 'exp' has no reassembly"), (torch.eye(3), torch.linalg.inv, "not linear"),
])
def test_bad_outsourcing_is_refused_with_nothing_sent(matrix, op, match):
    g, wire = gen(), Wire()
    state = g.get_state()
    with pytest.raises(ValueError, match=match):
        outsource(matrix, op, splinter=Splinter(2, 1, generator=g), wire=wire)
    assert len(wire) == 0 and torch.equal(g.get_state(), state)


def test_a_first_layer_that_is_not_linear_or_bad_parts_are_refused():
    with pytest.raises(ValueError, match="not linear: the server's part starts with ReLU"):
        first_linear(nn.Sequential(nn.ReLU(), nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="needs a Splinter and a Wire"):
        SplinteredLayer(nn.Linear(3, 2), "splinter", Wire())
    with pytest.raises(ValueError, match="holds NaN"):
        Splinter(2, generator=gen()).split(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        Splinter(2, generator=0)
