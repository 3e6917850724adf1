"""The vectorized executor tells the truth: every model either trains exactly as the sequential
reference does or falls back to it with one warning naming the reason, and the manifest and repr
say which executor ran. Its options and the loss come from FedConfig; regression runs too."""
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from toolkit import data, models
from toolkit.federated import ClientData, FedConfig, FederatedAveraging
from toolkit.parties import flat_state

FALLBACK = "the vectorized executor cannot train this model exactly"


def seeded(make):
    def build():
        torch.manual_seed(0)
        return make()
    return build


def run(make, clients, rounds=2, **settings):
    """(protocol, history, fallback warnings) for a fresh model; the global RNG is seeded so
    that models drawing from it (functional dropout) draw the same in every run."""
    fl = FederatedAveraging(make(), clients, config=FedConfig(seed=1, **settings))
    torch.manual_seed(123)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fl.fit(rounds=rounds)
    return fl, history, [w for w in caught if FALLBACK in str(w.message)]


def frozen_mlp():
    model = models.mlp([64, 128, 10])
    model.fc1.requires_grad_(False)
    return model


@pytest.mark.parametrize("hand_written_mlp", [True, False])
def test_frozen_parameters_stay_put_and_the_vectorized_executor_equals_the_reference(iid10, hand_written_mlp):
    make = seeded(frozen_mlp)
    seq, _, _ = run(make, iid10, executor="sequential", momentum=0.5, weight_decay=1e-3, mu=0.1)
    vec, history, fell = run(make, iid10, executor="vectorized", momentum=0.5, weight_decay=1e-3, mu=0.1,
                             hand_written_mlp=hand_written_mlp)
    assert not fell and vec.executor.ran == "vectorized" and history.attrs["manifest"]["executor"] == "vectorized"
    assert vec.executor.path == "vmap"  # the hand-written MLP trains every parameter, so it steps aside
    n_frozen = 64 * 128 + 128
    start = flat_state(seeded(frozen_mlp)())
    assert torch.equal(vec.weights[:n_frozen], start[:n_frozen])
    assert torch.equal(seq.weights[:n_frozen], start[:n_frozen])
    assert not torch.equal(vec.weights[n_frozen:], start[n_frozen:])  # the rest trained
    assert torch.allclose(vec.weights, seq.weights, atol=1e-6, rtol=0)


def bn_mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32, track_running_stats=False),
                         nn.ReLU(), nn.Linear(32, 10))


def test_batch_statistics_over_padded_batches_fall_back_with_one_warning_and_say_so(iid10):
    make = seeded(bn_mlp)  # iid10 holds 143 and 144 samples: partial last batches would be padded
    seq, _, _ = run(make, iid10, executor="sequential")
    vec, history, fell = run(make, iid10, executor="vectorized")
    assert len(fell) == 1 and "BatchNorm1d" in str(fell[0].message) and "batch statistics" in str(fell[0].message)
    assert torch.equal(vec.weights, seq.weights)
    manifest = history.attrs["manifest"]
    assert manifest["executor"] == "sequential" and "BatchNorm1d" in manifest["executor_fallback"]
    assert manifest["config"]["executor"] == "vectorized"  # what was asked, beside what ran
    assert "executor=sequential (vectorized fell back)" in repr(vec)


def test_batch_statistics_run_vectorized_and_exactly_when_no_padding_enters_a_batch(digits):
    parts = [torch.arange(i * 100, (i + 1) * 100) for i in range(6)]  # 100 samples each, batches of 32
    clients = ClientData.from_indices(digits, parts)
    make = seeded(bn_mlp)
    seq = FederatedAveraging(make(), clients, test=digits, config=FedConfig(executor="sequential"))
    vec = FederatedAveraging(make(), clients, test=digits, config=FedConfig(executor="vectorized"))
    seq.fit(rounds=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vec.fit(rounds=2)
    assert vec.executor.ran == "vectorized" and vec.history.attrs["manifest"]["executor"] == "vectorized"
    assert torch.allclose(vec.weights, seq.weights, atol=1e-5, rtol=0)


def test_a_float64_mlp_trains_exactly_on_both_vectorized_paths(digits):
    ds = data.Dataset("digits64", digits.x_train.double(), digits.y_train, digits.x_test.double(), digits.y_test,
                      digits.classes)
    clients = data.partition(ds, 5, "dirichlet", alpha=0.5, seed=1)
    make = seeded(lambda: models.mlp([64, 32, 10]).double())
    seq, _, _ = run(make, clients, executor="sequential", momentum=0.5, mu=0.05)
    for hand_written_mlp, path in ((True, "hand-written MLP"), (False, "vmap")):
        vec, _, fell = run(make, clients, executor="vectorized", momentum=0.5, mu=0.05,
                           hand_written_mlp=hand_written_mlp)
        assert not fell and vec.executor.ran == "vectorized" and vec.executor.path == path
        assert vec.weights.dtype == torch.float64
        assert torch.allclose(vec.weights, seq.weights, atol=1e-10, rtol=0)


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(F.dropout(torch.relu(self.fc1(x.flatten(1))), 0.2, training=True))


class ItemInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        out = self.fc(x.flatten(1))
        return out * min(1.0, 1e6 / (1.0 + out.abs().max().item()))  # a Python number from a tensor


@pytest.mark.parametrize("model", [FunctionalDropout, ItemInForward])
def test_a_model_vmap_cannot_run_falls_back_with_one_warning(iid10, model):
    make = seeded(model)
    seq, _, _ = run(make, iid10, executor="sequential")
    vec, history, fell = run(make, iid10, rounds=3, executor="vectorized")
    assert len(fell) == 1 and "vmap cannot run it" in str(fell[0].message)
    assert vec.executor.ran == "sequential" and history.attrs["manifest"]["executor"] == "sequential"
    assert "vmap cannot run it" in history.attrs["manifest"]["executor_fallback"]
    assert "executor=sequential (vectorized fell back)" in repr(vec)
    again, _, _ = run(make, iid10, executor="vectorized")
    assert torch.equal(again.weights, seq.weights)  # the fallback is the reference, numbers and all


def test_executor_options_come_from_the_config_and_are_checked(iid10):
    fl = FederatedAveraging(seeded(lambda: models.mlp([64, 128, 10]))(), iid10,
                            config=FedConfig(chunk_bytes=50_000, hand_written_mlp=False))
    assert fl.executor.chunk_bytes == 50_000 and fl.executor.hand_written_mlp is False
    assert "executor=vectorized" in repr(fl)  # before any round: what was asked
    fl.fit(rounds=1)
    assert fl.executor.path == "vmap" and fl.history.attrs["manifest"]["config"]["chunk_bytes"] == 50_000
    for bad in ({"chunk_bytes": 0}, {"chunk_bytes": 1.5}, {"hand_written_mlp": "yes"}, {"loss": "hinge"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FedConfig(**bad)


def regression_clients(n_clients=4, n=90, seed=0):
    """y = x A + noise, (N, 2) float targets over 8 features; one namespace per client."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(8, 2, generator=g)
    x_test = torch.randn(200, 8, generator=g)
    out = []
    for i in range(n_clients):
        x = torch.randn(n + 7 * i, 8, generator=g)  # uneven sizes: padded batches
        out.append(SimpleNamespace(x_train=x, y_train=x @ a + 0.1 * torch.randn(len(x), 2, generator=g),
                                   x_test=x_test, y_test=x_test @ a))
    return out


def test_a_regression_loss_trains_with_float_targets_on_every_executor():
    clients = regression_clients()
    make = seeded(lambda: models.mlp([8, 16, 2]))
    runs = {}
    for name, settings in {"sequential": {"executor": "sequential"}, "hand-written MLP": {},
                           "vmap": {"hand_written_mlp": False}}.items():
        fl, history, fell = run(make, clients, rounds=8, loss="mse", lr=0.05, momentum=0.5, **settings)
        assert not fell and (name == "sequential" or fl.executor.path == name)
        runs[name] = (fl.weights, history)
    w_seq, h_seq = runs["sequential"]
    for name in ("hand-written MLP", "vmap"):
        assert torch.allclose(runs[name][0], w_seq, atol=1e-5, rtol=0), name
    assert "accuracy" not in h_seq.columns  # accuracy only for classification
    assert h_seq["test_loss"].iloc[-1] < 0.2 * h_seq["test_loss"].iloc[0]
    fl = FederatedAveraging(make(), clients, config=FedConfig(loss="mse"))
    with torch.no_grad():
        mse = float(((fl.model(clients[0].x_test) - clients[0].y_test) ** 2).mean())
    assert fl.evaluate()["test_loss"] == pytest.approx(mse, rel=1e-6)


def test_one_output_per_sample_regresses_onto_one_dimensional_targets():
    clients = [SimpleNamespace(x_train=c.x_train, y_train=c.y_train[:, 0], x_test=c.x_test, y_test=c.y_test[:, 0])
               for c in regression_clients()]
    make = seeded(lambda: models.mlp([8, 16, 1]))
    seq, _, _ = run(make, clients, loss="mse", executor="sequential")
    vec, history, _ = run(make, clients, loss="mse")
    assert torch.allclose(vec.weights, seq.weights, atol=1e-5, rtol=0)
    assert history["test_loss"].iloc[-1] < history["test_loss"].iloc[0]
    with pytest.raises(ValueError, match=r"outputs \(2,\) per sample but the targets hold \(\) \(1 values\)"):
        FederatedAveraging(models.mlp([8, 2]), clients, config=FedConfig(loss="mse"))


@pytest.mark.parametrize("executor", ["vectorized", "sequential"])
def test_each_client_trains_from_its_own_start_row_and_reports_its_update_from_it(iid10, executor):
    from toolkit.federated import EXECUTORS, RoundPlan, plan_round

    clients = ClientData(iid10)
    config = FedConfig(momentum=0.5, mu=0.1, batch_size=16, local_epochs=2)
    plan = plan_round(clients, fraction=0.5, dropout=0.0, epochs=2, generator=torch.Generator().manual_seed(0))
    model = seeded(lambda: models.mlp([64, 128, 10]))()
    w = flat_state(model)
    start = w + 0.05 * torch.randn(len(plan.clients), len(w), generator=torch.Generator().manual_seed(1))
    run_all = EXECUTORS[executor]()
    updates, losses = run_all.train(model, start, clients, plan, config)
    assert torch.equal(flat_state(model), w)  # the model is left as it was found
    for row in range(len(plan.clients)):
        alone = RoundPlan(plan.clients[row:row + 1], plan.dropped, [o[row:row + 1] for o in plan.orders],
                          plan.counts[row:row + 1])
        u, loss = EXECUTORS[executor]().train(model, start[row], clients, alone, config)
        assert torch.allclose(updates[row], u[0], atol=1e-6, rtol=0) and loss[0] == pytest.approx(float(losses[row]))
    shared, _ = EXECUTORS[executor]().train(model, start[0], clients, plan, config)
    rows, _ = EXECUTORS[executor]().train(model, start[0].expand_as(start).clone(), clients, plan, config)
    assert torch.allclose(shared, rows, atol=1e-6, rtol=0)  # (P,) is (M, P) with equal rows
    with pytest.raises(ValueError, match=r"start weights must be \(9610,\) for everyone or \(5, 9610\)"):
        run_all.train(model, start[:2], clients, plan, config)


def test_a_dropout_model_gives_the_same_numbers_for_the_same_seed_whatever_the_global_rng(iid10):
    """The model's own dropout masks come from a stream fixed by FedConfig.seed, not torch's global RNG."""
    runs = []
    for disturb in (1, 2, 3):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))
        fl = FederatedAveraging(model, iid10, config=FedConfig(executor="sequential", seed=7))
        torch.manual_seed(disturb)
        fl.fit(rounds=2)
        runs.append(fl.weights.clone())
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[1], runs[2])
    torch.manual_seed(0)
    other = FederatedAveraging(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3),
                                             nn.Linear(32, 10)), iid10, config=FedConfig(executor="sequential", seed=8))
    other.fit(rounds=2)
    assert not torch.equal(other.weights, runs[0])
