"""Federated engine: executors agree, FedAvg learns, the wire carries every update, bad input is refused."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from toolkit import data, models
from toolkit.audit import find_rows
from toolkit.federated import ClientData, FedConfig, FederatedAveraging
from toolkit.federated.server import FedAdam


def mlp():
    torch.manual_seed(0)
    return models.mlp([64, 128, 10])


@pytest.mark.parametrize("settings", [
    {},
    {"momentum": 0.9, "weight_decay": 1e-3, "local_epochs": 2, "batch_size": 16},
    {"mu": 0.1, "fraction": 0.5, "dropout": 0.2},
    {"server_optimizer": "fedadam", "server_lr": 0.01},
])
def test_vectorized_executor_equals_sequential_reference_after_three_rounds(digits, settings):
    clients = data.partition(digits, 7, "dirichlet", alpha=0.5, seed=1)  # uneven client sizes
    runs = {}
    for executor in ("sequential", "vectorized"):
        fl = FederatedAveraging(mlp(), clients, config=FedConfig(executor=executor, seed=4, **settings))
        history = fl.fit(rounds=3)
        assert fl.executor.ran == history.attrs["manifest"]["executor"] == executor  # no silent fallback
        runs[executor] = (fl.weights, history)
    (w_seq, h_seq), (w_vec, h_vec) = runs["sequential"], runs["vectorized"]
    assert torch.allclose(w_seq, w_vec, atol=1e-5, rtol=0)
    assert h_seq["loss"].tolist() == pytest.approx(h_vec["loss"].tolist(), abs=1e-5)
    assert h_seq["clients"].tolist() == h_vec["clients"].tolist()


@pytest.fixture(scope="module")
def fedavg_run(iid10):
    fl = FederatedAveraging(mlp(), iid10, config=FedConfig(lr=0.5, local_epochs=2))
    return fl, fl.fit(rounds=40)


def test_fedavg_learns_digits_with_ten_iid_clients(fedavg_run):
    fl, history = fedavg_run
    assert history["accuracy"].iloc[-1] >= 0.95, history.tail()
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    assert list(history.columns[:4]) == ["round", "loss", "test_loss", "accuracy"]


def test_every_update_crosses_the_wire_and_bytes_add_up(fedavg_run, digits):
    fl, history = fedavg_run
    p = len(fl.weights)
    assert (history["bytes_up"] == 10 * p * 4).all() and (history["bytes_down"] == 10 * p * 4).all()
    updates = fl.wire.observed(by="server", kind="update")
    assert len(updates) == 40 * 10 and {u.sender for u in updates} == {f"client:{i}" for i in range(10)}
    assert len(fl.wire.observed(by="client:3", kind="weights")) == 40
    assert {t.kind for t in fl.wire.observed()} == {"update", "weights"}
    assert find_rows(fl.wire.observed(), digits.x_train) == []
    assert fl.wire.total_bytes == history["bytes_up"].sum() + history["bytes_down"].sum()
    assert sum(t.nbytes for t in fl.wire.observed()) == fl.wire.total_bytes


def test_server_update_is_the_sample_weighted_mean_of_the_updates(digits):
    clients = data.partition(digits, 4, "dirichlet", alpha=1.0, seed=2)
    fl = FederatedAveraging(mlp(), clients, config=FedConfig(seed=1))
    before = fl.weights.clone()
    fl.fit(rounds=1)
    got = fl.wire.observed(by="server", kind="update")
    sizes = torch.tensor([len(c.y_train) for c in clients], dtype=torch.float64)
    mean = sum(t.tensor.double() * n for t, n in zip(got, sizes)) / sizes.sum()
    assert torch.allclose(fl.weights.double(), before.double() + mean, atol=1e-6)


def test_dirichlet_skew_still_learns_and_fedprox_runs(digits):
    clients = data.partition(digits, 10, "dirichlet", alpha=0.1, seed=0)
    results = {}
    for mu in (0.0, 0.1):
        fl = FederatedAveraging(mlp(), clients, config=FedConfig(lr=0.1, mu=mu, local_epochs=2))
        results[mu] = fl.fit(rounds=20)["accuracy"].iloc[-1]
    assert results[0.0] > 0.6 and results[0.1] > 0.6, results


@pytest.mark.parametrize("server_optimizer,server_lr", [("fedavgm", 1.0), ("fedadam", 0.01)])
def test_server_optimizers_learn(iid10, server_optimizer, server_lr):
    fl = FederatedAveraging(mlp(), iid10, config=FedConfig(lr=0.1, server_optimizer=server_optimizer,
                                                           server_lr=server_lr))
    assert fl.fit(rounds=15)["accuracy"].iloc[-1] > 0.85


def test_fedadam_step_by_hand():
    opt = FedAdam(FedConfig(server_lr=0.1, server_betas=(0.5, 0.75), server_tau=0.01))
    w = opt.step(torch.zeros(2), torch.tensor([1.0, -2.0]))
    m, v = torch.tensor([0.5, -1.0]), torch.tensor([0.25, 1.0])
    assert torch.allclose(w, 0.1 * m / (v.sqrt() + 0.01))


def test_dropouts_are_counted_and_a_round_where_everyone_drops_changes_nothing(iid10):
    fl = FederatedAveraging(mlp(), iid10, config=FedConfig(fraction=0.5, dropout=0.5, seed=3))
    history = fl.fit(rounds=6)
    assert (history["sampled"] == 5).all()
    assert (history["clients"] + history["dropped"] == history["sampled"]).all()
    assert history["dropped"].sum() > 0
    lonely = FederatedAveraging(mlp(), iid10, config=FedConfig(fraction=0.1, dropout=0.9, seed=0))
    for _ in range(20):
        before = lonely.weights.clone()
        row = lonely.fit(rounds=1).iloc[0]
        if row["clients"] == 0:
            assert torch.equal(lonely.weights, before) and row["bytes_up"] == 0
            break
    else:
        pytest.fail("no round without participants in 20 tries")


def test_a_nan_update_is_dropped_with_a_warning_and_recorded(iid10):
    def poison(updates, *, generator=None):
        return updates * float("nan")

    fl = FederatedAveraging(mlp(), iid10, config=FedConfig(lr=0.5), malicious={2: poison})
    with pytest.warns(RuntimeWarning, match=r"dropped non-finite .*client:2"):
        history = fl.fit(rounds=3)
    assert history["rejected"].tolist() == [1, 1, 1] and torch.isfinite(fl.weights).all()
    assert history["accuracy"].iloc[-1] > 0.5


@pytest.mark.parametrize("executor", ["vectorized", "sequential"])
def test_an_inf_update_is_dropped_with_a_warning_and_recorded(iid10, executor):
    def blow_up(updates, *, generator=None):
        out = updates.clone()
        out[:, 7] = float("inf")  # one coordinate is enough
        return out

    fl = FederatedAveraging(mlp(), iid10, config=FedConfig(lr=0.5, executor=executor), malicious={6: blow_up})
    with pytest.warns(RuntimeWarning, match=r"dropped non-finite .*client:6"):
        history = fl.fit(rounds=3)
    assert history["rejected"].tolist() == [1, 1, 1] and torch.isfinite(fl.weights).all()
    assert (history["clients"] == 10).all()  # it was sampled and answered, then dropped
    assert history["accuracy"].iloc[-1] > 0.5


def test_batchnorm_models_fall_back_to_the_reference_with_a_clear_warning(iid10):
    def bn_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))

    vec = FederatedAveraging(bn_model(), iid10, config=FedConfig(executor="vectorized"))
    with pytest.warns(UserWarning, match="BatchNorm1d.*running statistics.*falling back to the sequential") as caught:
        history = vec.fit(rounds=2)
    assert len([w for w in caught if "falling back" in str(w.message)]) == 1  # one warning, not one per round
    assert vec.executor.ran == history.attrs["manifest"]["executor"] == "sequential"
    seq = FederatedAveraging(bn_model(), iid10, config=FedConfig(executor="sequential"))
    seq.fit(rounds=2)
    assert torch.equal(vec.weights, seq.weights)
    running_mean = vec.weights[-(32 * 2 + 1):-(32 + 1)]  # buffers travel too and are averaged
    assert running_mean.abs().sum() > 0


def test_same_seed_same_numbers(iid10):
    a = FederatedAveraging(mlp(), iid10, config=FedConfig(fraction=0.5, seed=9)).fit(rounds=3)
    b = FederatedAveraging(mlp(), iid10, config=FedConfig(fraction=0.5, seed=9)).fit(rounds=3)
    cols = ["loss", "accuracy", "bytes_up", "clients"]
    assert a[cols].equals(b[cols])


def test_manifest_traces_the_run(iid10):
    fl = FederatedAveraging(mlp(), iid10, config=FedConfig(seed=5))
    history = fl.fit(rounds=1)
    m = history.attrs["manifest"]
    assert m["seed"] == 5 and m["config"]["lr"] == 0.05 and m["packages"]["torch"].startswith("2.")
    assert m["protocol"] == "FederatedAveraging" and m["round"] == 1 and m["clients"] == 10
    assert m["executor"] == "vectorized" and m["executor_fallback"] is None
    assert history["seconds"].dtype == "float64" and (history["seconds"] >= 0).all()  # a duration per round


# -- bad input --------------------------------------------------------------------------------
def test_bad_federated_input(digits, iid10):
    with pytest.raises(ValueError, match="at least one client, got zero"):
        FederatedAveraging(mlp(), [])
    with pytest.raises(ValueError, match="client:1 has no data"):
        FederatedAveraging(mlp(), [iid10[0], SimpleNamespace(x_train=digits.x_train[:0], y_train=digits.y_train[:0])])
    for fraction in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"fraction must be a number in \(0.0, 1.0\]"):
            FedConfig(fraction=fraction)
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0.0, 1.0\)"):
        FedConfig(dropout=1.0)
    with pytest.raises(ValueError, match="unknown aggregator 'mode'"):
        FederatedAveraging(mlp(), iid10, aggregator="mode")
    with pytest.raises(ValueError, match="unknown executor"):
        FederatedAveraging(mlp(), iid10, config=FedConfig(executor="ray"))
    with pytest.raises(ValueError, match="cannot take the clients' inputs"):
        FederatedAveraging(models.mlp([32, 10]), iid10)
    with pytest.raises(ValueError, match="outputs .* but the labels have 10 classes"):
        FederatedAveraging(models.mlp([64, 5]), iid10)
    with pytest.raises(ValueError, match="no parameter to train"):
        FederatedAveraging(mlp().requires_grad_(False), iid10)
    with pytest.raises(ValueError, match="malicious client indices \\[12\\]"):
        FederatedAveraging(mlp(), iid10, malicious={12: lambda u, generator=None: u})
    with pytest.raises(ValueError, match="rounds must be a positive int"):
        FederatedAveraging(mlp(), iid10).fit(rounds=0)
    truncated = FederatedAveraging(mlp(), iid10, malicious={4: lambda u, generator=None: u[:, :100]})
    before = truncated.weights.clone()
    with pytest.raises(ValueError, match=r"mismatched parameter shapes: .* returned \(1, 100\) .* \[4\]"):
        truncated.fit(rounds=1)
    assert torch.equal(truncated.weights, before)  # nothing half-applied


def client(x, y):
    return SimpleNamespace(x_train=x, y_train=y)


def test_bad_client_data_is_refused_where_it_enters_naming_client_tensor_and_index(digits, iid10):
    x, y = iid10[2].x_train.clone(), iid10[2].y_train.clone()
    nan_x = x.clone()
    nan_x[5, 0, 3, 1] = float("nan")
    clients = [iid10[0], iid10[1], client(nan_x, y)]
    with pytest.raises(ValueError, match=r"client:2 x_train holds NaN at index \(5, 0, 3, 1\)"):
        FederatedAveraging(mlp(), clients, test=digits)
    rows = torch.arange(200, 300)
    bad = data.Dataset("digits", digits.x_train.clone(), digits.y_train, digits.x_test, digits.y_test, digits.classes)
    bad.x_train[rows[17], 0, 0, 2] = float("inf")
    with pytest.raises(ValueError, match=r"client:1 x_train holds Inf at index \(17, 0, 0, 2\)"):
        ClientData.from_indices(bad, [torch.arange(100), rows])
    with pytest.raises(ValueError, match=r"client:1 y_train must be integer class indices \(torch.long\), got torch.float"):
        ClientData([iid10[0], client(x, y.float() + 0.4)])  # would have been truncated into wrong labels
    negative = y.clone()
    negative[7] = -1
    with pytest.raises(ValueError, match="client:0 y_train holds a negative label -1 at index 7"):
        ClientData([client(x, negative)])
    with pytest.raises(ValueError, match="y_train holds a negative label -1 at index 7"):
        ClientData.from_indices(client(x, negative), [torch.arange(50), torch.arange(50, 100)])
    with pytest.raises(TypeError, match=r"client:0 x_train must be a torch.Tensor, got numpy.ndarray \(convert it"):
        ClientData([client(x.numpy(), y)])
    with pytest.raises(TypeError, match="client:0 y_train must be a torch.Tensor, got builtins.list"):
        ClientData([client(x, y.tolist())])
    with pytest.raises(ValueError, match="x_test holds NaN"):
        FederatedAveraging(mlp(), iid10, test=SimpleNamespace(x_test=nan_x, y_test=y))
    with pytest.raises(ValueError, match="y_test must be integer class indices"):
        FederatedAveraging(mlp(), iid10, test=SimpleNamespace(x_test=x, y_test=y.float()))
    with pytest.raises(ValueError, match=r"outputs \(10,\) per sample but the labels have 12 classes"):
        FederatedAveraging(mlp(), iid10, test=SimpleNamespace(x_test=x, y_test=y.clamp(max=0) + 11))


def test_targets_must_fit_the_loss(iid10):
    x = torch.randn(40, 8)
    target = x[:, :2].clone()
    regression = [client(x, target)]
    test = SimpleNamespace(x_test=x, y_test=target)
    assert ClientData(regression, regression=True).y.dtype == torch.float32
    target_inf = target.clone()
    target_inf[3, 1] = float("inf")
    with pytest.raises(ValueError, match=r"client:0 y_train holds Inf at index \(3, 1\)"):
        FederatedAveraging(models.mlp([8, 2]), [client(x, target_inf)], test=test, config=FedConfig(loss="mse"))
    with pytest.raises(ValueError, match="client:0 y_train must be float targets for a regression loss"):
        FederatedAveraging(models.mlp([8, 2]), [client(x, target.long())], test=test, config=FedConfig(loss="mse"))
    with pytest.raises(ValueError, match=r"y_test must hold one float target \(2,\) per test input, got \(40,\)"):
        FederatedAveraging(models.mlp([8, 2]), regression, test=SimpleNamespace(x_test=x, y_test=target[:, 0]),
                           config=FedConfig(loss="mse"))
    with pytest.raises(ValueError, match="loss 'mse' needs float targets, but the ClientData holds class labels"):
        FederatedAveraging(mlp(), ClientData(iid10), config=FedConfig(loss="mse"))
    with pytest.raises(ValueError, match="loss 'cross_entropy' needs class labels"):
        FederatedAveraging(models.mlp([8, 2]), ClientData(regression, regression=True), test=test)


@pytest.mark.parametrize("settings,message", [
    ({"batch_size": 2.5}, "batch_size must be a positive int, got 2.5"),
    ({"local_epochs": 0}, "local_epochs must be a positive int"),
    ({"momentum": -0.1}, r"momentum must be a number in \[0.0, 1.0\), got -0.1"),
    ({"server_momentum": 1.0}, r"server_momentum must be a number in \[0.0, 1.0\)"),
    ({"lr": 0.0}, "lr must be a positive number"),
    ({"server_tau": -1e-3}, "server_tau must be a positive number"),
    ({"weight_decay": -1.0}, "weight_decay must be a non-negative number"),
    ({"mu": float("nan")}, "mu must be a non-negative number"),
    ({"server_betas": (0.9,)}, "server_betas must be two values"),
    ({"server_betas": (0.9, 1.0)}, r"server_betas\[1\] must be a number in \[0.0, 1.0\)"),
    ({"seed": -1}, "seed must be a non-negative int"),
    ({"record": "yes"}, "record must be True or False"),
    ({"eval_batch_size": True}, "eval_batch_size must be a positive int, got True"),
])
def test_fedconfig_refuses_bad_settings_by_name(settings, message):
    with pytest.raises(ValueError, match=message):
        FedConfig(**settings)


def test_client_data_from_indices_equals_the_partition(digits):
    parts = data.iid(digits.y_train, 7, seed=3)
    a = ClientData.from_indices(digits, parts)
    b = ClientData([digits.subset(i) for i in parts])
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.counts, b.counts)
    with pytest.raises(ValueError, match="client:1 has no data"):
        ClientData.from_indices(digits, [parts[0], torch.tensor([], dtype=torch.long)])


@pytest.mark.parametrize("builder", ["mlp", "convnet"])
def test_vmap_path_equals_hand_written_mlp_and_the_reference(digits, builder):
    """The MLP normally takes the hand-written batched path; vmap serves every other model (and
    the MLP when asked); several passes (a small chunk_bytes) give the same numbers as one."""
    clients = data.partition(digits, 5, "dirichlet", alpha=0.5, seed=1)
    make = (lambda: mlp()) if builder == "mlp" else (
        lambda: (torch.manual_seed(0), models.convnet(width=4))[1])
    settings = {"vmap": {"hand_written_mlp": False}, "default, chunked": {"chunk_bytes": 50_000},
                "sequential": {"executor": "sequential"}}
    runs, paths = {}, {}
    for name, options in settings.items():
        fl = FederatedAveraging(make(), clients, config=FedConfig(momentum=0.5, mu=0.05, batch_size=16, seed=2,
                                                                  **options))
        fl.fit(rounds=2)
        runs[name], paths[name] = fl.weights, getattr(fl.executor, "path", fl.executor.ran)
        assert fl.executor.ran == ("sequential" if name == "sequential" else "vectorized")
    assert paths == {"vmap": "vmap", "default, chunked": "hand-written MLP" if builder == "mlp" else "vmap",
                     "sequential": "sequential"}
    for name in ("vmap", "default, chunked"):
        assert torch.allclose(runs[name], runs["sequential"], atol=1e-5, rtol=0), name


def test_client_data_stacks_and_pads(iid10):
    cd = ClientData(iid10)
    assert len(cd) == 10 and cd.x.shape[:2] == (10, int(cd.counts.max())) and cd.shape == (1, 8, 8)
    assert torch.equal(cd.x[3, :cd.counts[3]], iid10[3].x_train)
    assert "10 clients, 1437 samples" in repr(cd)
