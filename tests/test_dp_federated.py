"""DP-FedAvg and per-sample DP-SGD in the federated engine: the vectorized clipped gradients equal
Opacus's on the same batch, the noise is what it claims and repeats with the seed, 1,000 clients
train in one vectorized pass, and every DP run's history carries epsilon and delta from the
accounting module's Opacus accountants."""
import math
from types import SimpleNamespace

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from defenses import DPFedAvg
from toolkit import data, models
from toolkit.accounting import epsilon
from toolkit.federated import ClientData, FedConfig, FederatedAveraging, LocalDPAccountant, plan_round
from toolkit.federated.asynchronous import FedAsync, FedBuff
from toolkit.federated.executors import SequentialExecutor, VectorizedExecutor
from toolkit.parties import flat_state, load_flat_state

CLIP = 0.5


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


@pytest.fixture(scope="module")
def clients16(digits):
    """20 clients of 16 samples each: one local step at batch size 16."""
    return ClientData.from_indices(digits, [torch.arange(16 * i, 16 * (i + 1)) for i in range(20)])


def mlp():
    torch.manual_seed(0)
    return models.mlp([64, 32, 10])


def cnn():
    """The model zoo's ConvNet with average instead of max pooling: a max over near-equal values
    picks its winner from the last float bit, which batched and per-sample convolutions compute
    differently on some CPUs (measured on an AMD EPYC: one sample's flipped argmax moved a client's update
    by 6.5e-5, 4% of it); an average has no such discontinuity, so the comparison tests
    the executors, not the tie-breaking."""
    torch.manual_seed(0)
    net = models.convnet(width=4)
    for name, module in net.named_children():
        if isinstance(module, nn.MaxPool2d):
            setattr(net, name, nn.AvgPool2d(module.kernel_size, module.stride))
    return net


def opacus_step_gradient(model, x, y, *, batch_size):
    """What Opacus's DPOptimizer leaves in .grad for one batch (noise off): clipped per-sample
    gradients summed and divided by the expected batch size; also the per-sample norms."""
    net = GradSampleModule(model, loss_reduction="mean")
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=CLIP,
                      expected_batch_size=batch_size)
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(net(x), y).backward()
    norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in model.parameters()], 1).norm(dim=1)
    opt.pre_step()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    net._close()
    return grad, norms


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # Opacus's hooks on the first layer
@pytest.mark.parametrize("make, hand_written", [(mlp, True), (mlp, False), (cnn, False)],
                         ids=["hand-written MLP", "vmap MLP", "vmap ConvNet"])
def test_noise_off_the_vectorized_clipped_gradients_equal_opacus_on_the_same_batch(clients16, make, hand_written):
    config = FedConfig(batch_size=16, lr=1.0, dp_max_grad_norm=CLIP, hand_written_mlp=hand_written)
    model = make()
    start = flat_state(model).clone()
    plan = plan_round(clients16, fraction=1.0, dropout=0.0, epochs=1, generator=torch.Generator().manual_seed(3))
    executor = VectorizedExecutor(hand_written_mlp=hand_written)
    updates, _ = executor.train(model, start, clients16, plan, config)
    assert executor.ran == "vectorized" and executor.path == ("hand-written MLP" if hand_written else "vmap")
    clipped = 0
    for row, client in enumerate(plan.clients.tolist()):
        load_flat_state(model, start)
        batch = plan.orders[0][row, :16]
        grad, norms = opacus_step_gradient(model, clients16.x[client, batch], clients16.y[client, batch],
                                           batch_size=16)
        clipped += int((norms > CLIP).sum())
        torch.testing.assert_close(-updates[row], grad, atol=1e-6, rtol=0)  # one SGD step at lr 1
    assert clipped > 100  # most samples were clipped: the comparison exercises the clipping


@pytest.mark.parametrize("make, hand_written", [(mlp, True), (mlp, False), (cnn, False)],
                         ids=["hand-written MLP", "vmap MLP", "vmap ConvNet"])
def test_noise_off_a_round_equals_the_sequential_opacus_executor(digits, make, hand_written):
    sizes = [40, 33, 57, 20, 64, 45]  # partial batches and clients that sit out late steps
    bounds = torch.tensor([0] + sizes).cumsum(0)
    clients = ClientData.from_indices(digits, [torch.arange(int(a), int(b)) for a, b in zip(bounds, bounds[1:])])
    results = {}
    for executor in ("sequential", "vectorized"):
        config = FedConfig(executor=executor, batch_size=16, local_epochs=2, momentum=0.9, weight_decay=1e-3,
                           dp_max_grad_norm=CLIP, hand_written_mlp=hand_written, seed=4)
        fl = FederatedAveraging(make(), clients, test=digits, config=config)
        fl.fit(rounds=2)
        assert fl.executor.ran == executor
        results[executor] = fl.weights
    torch.testing.assert_close(results["vectorized"], results["sequential"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("hand_written", [True, False], ids=["hand-written MLP", "vmap MLP"])
def test_noise_off_a_regression_round_equals_the_sequential_opacus_executor(digits, hand_written):
    onehot = nn.functional.one_hot(digits.y_train[:120], 10).float()
    parts = [SimpleNamespace(x_train=digits.x_train[i:i + 30], y_train=onehot[i:i + 30]) for i in range(0, 120, 30)]
    clients = ClientData(parts, regression=True)
    test = SimpleNamespace(x_test=digits.x_test[:50], y_test=nn.functional.one_hot(digits.y_test[:50], 10).float())
    results = {}
    for executor in ("sequential", "vectorized"):
        config = FedConfig(executor=executor, loss="mse", batch_size=8, dp_max_grad_norm=0.05,
                           hand_written_mlp=hand_written)
        fl = FederatedAveraging(mlp(), clients, test=test, config=config)
        fl.fit(rounds=1)
        assert fl.executor.ran == executor
        results[executor] = fl.weights
    torch.testing.assert_close(results["vectorized"], results["sequential"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("executor", ["sequential", "vectorized"])
def test_noise_on_the_same_seed_gives_the_same_numbers_and_another_seed_others(digits, executor):
    def weights(seed):
        config = FedConfig(executor=executor, batch_size=32, dp_max_grad_norm=CLIP, dp_noise_multiplier=1.0, seed=seed)
        fl = FederatedAveraging(mlp(), data.partition(digits, 5), config=config)
        fl.fit(rounds=2)
        return fl.weights

    a = weights(1)
    assert torch.equal(a, weights(1))
    assert not torch.allclose(a, weights(2))


@pytest.mark.parametrize("executor", [SequentialExecutor, VectorizedExecutor], ids=["sequential", "vectorized"])
def test_the_noise_has_standard_deviation_noise_multiplier_times_clip_over_the_batch(clients16, executor):
    model = mlp()
    start = flat_state(model).clone()
    plan = plan_round(clients16, fraction=1.0, dropout=0.0, epochs=1, generator=torch.Generator().manual_seed(0))
    executor = executor()
    quiet, _ = executor.train(model, start, clients16, plan, FedConfig(batch_size=16, lr=1.0, dp_max_grad_norm=CLIP))
    quiet = quiet.clone()
    z = 2.0
    noisy, _ = executor.train(model, start, clients16, plan,
                              FedConfig(batch_size=16, lr=1.0, dp_max_grad_norm=CLIP, dp_noise_multiplier=z),
                              generator=torch.Generator().manual_seed(0))
    noise = quiet - noisy  # (20, P): lr * N(0, (z C)^2) / batch size
    assert abs(float(noise.std()) / (z * CLIP / 16) - 1) < 0.02  # 20 * 2,410 draws
    assert abs(float(noise.mean())) < 3 * z * CLIP / 16 / math.sqrt(noise.numel())


def test_1000_clients_train_with_per_sample_dp_in_one_vectorized_pass(digits):
    clients = ClientData.from_indices(digits, data.iid(digits.y_train, 1000, seed=0))
    accountant = LocalDPAccountant(accountants=("rdp",))
    config = FedConfig(batch_size=1, dp_max_grad_norm=1.0, dp_noise_multiplier=1.0, chunk_bytes=2**27)
    fl = FederatedAveraging(mlp(), clients, test=digits, config=config, monitors=[accountant])
    history = fl.fit(rounds=2)
    assert fl.executor.ran == "vectorized" and fl.executor.fallback is None
    assert fl.executor.path == "hand-written MLP" and fl.executor.passes == 1
    assert history["clients"].tolist() == [1000, 1000]
    table = accountant.clients()
    assert len(table) == 1000 and set(table["samples"]) == {1, 2}
    # a client with n samples took n steps per round at sample rate 1/n, over 2 rounds
    for n in (1, 2):
        expected = epsilon(noise_multiplier=1.0, sample_rate=1 / n, steps=2 * n, delta=1e-5)
        assert table.loc[table.samples == n, "epsilon_rdp"].tolist() == pytest.approx([expected] * (table.samples == n).sum())
    assert history["client_epsilon_rdp"].iloc[-1] == pytest.approx(table["epsilon_rdp"].max())
    assert (history["client_delta"] == 1e-5).all()


def test_each_clients_epsilon_composes_its_steps_over_the_rounds_it_trained(digits):
    accountant = LocalDPAccountant()
    config = FedConfig(batch_size=32, fraction=0.5, local_epochs=2, dp_max_grad_norm=1.0, dp_noise_multiplier=1.2)
    fl = FederatedAveraging(mlp(), data.partition(digits, 6), config=config, monitors=[accountant])
    history = fl.fit(rounds=3)
    table = accountant.clients()
    assert table["steps"].sum() == 3 * 3 * 2 * 8  # 3 rounds, 3 clients, 2 epochs, ceil(239.5 / 32) = 8 steps
    for row in table.itertuples():
        q = min(1.0, 32 / row.samples)
        assert row.sample_rate == pytest.approx(q)
        if row.steps:
            for name in ("rdp", "prv"):
                expected = epsilon(noise_multiplier=1.2, sample_rate=q, steps=row.steps, delta=1e-5, accountant=name)
                assert getattr(row, f"epsilon_{name}") == pytest.approx(expected, rel=1e-6)
        else:
            assert row.epsilon_rdp == 0.0
    assert history["client_epsilon_prv"].is_monotonic_increasing
    assert history["client_epsilon_prv"].iloc[-1] == pytest.approx(table["epsilon_prv"].max())


def test_dp_fedavg_clips_each_update_sums_adds_noise_and_divides_by_the_fixed_cohort():
    g = torch.Generator().manual_seed(0)
    updates = torch.randn(3, 50, generator=g) * torch.tensor([[0.1], [1.0], [10.0]])
    norms = updates.norm(dim=1)
    clipped = updates * (1.0 / norms).clamp(max=1.0)[:, None]
    quiet = DPFedAvg(clip=1.0, noise_multiplier=0.0, clients_per_round=4, total_clients=8,
                     generator=torch.Generator())
    torch.testing.assert_close(quiet(updates, torch.tensor([5.0, 1.0, 1.0])), clipped.sum(0) / 4)  # weights ignored
    assert quiet.report()["dp_clipped"] == pytest.approx(2 / 3)
    assert quiet.report()["epsilon_rdp"] == math.inf  # released without noise
    noisy = DPFedAvg(clip=1.0, noise_multiplier=0.7, clients_per_round=4, total_clients=8,
                     generator=torch.Generator().manual_seed(9), accountants=("rdp",))
    noise = torch.randn(50, generator=torch.Generator().manual_seed(9)) * 0.7
    torch.testing.assert_close(noisy(updates), (clipped.sum(0) + noise) / 4)


def test_dp_fedavg_reports_epsilon_and_delta_every_round_from_the_accountants(digits):
    config = FedConfig(fraction=0.25, batch_size=64)
    agg = DPFedAvg.for_config(config, 8, clip=1.0, noise_multiplier=1.1, generator=torch.Generator().manual_seed(0))
    assert (agg.clients_per_round, agg.sample_rate) == (2, 0.25)
    fl = FederatedAveraging(mlp(), data.partition(digits, 8), config=config, aggregator=agg)
    history = fl.fit(rounds=2)
    for r, row in enumerate(history.itertuples(), start=1):
        for name in ("rdp", "prv"):
            expected = epsilon(noise_multiplier=1.1, sample_rate=0.25, steps=r, delta=1e-5, accountant=name)
            assert getattr(row, f"epsilon_{name}") == pytest.approx(expected, rel=1e-6)
    assert (history["delta"] == 1e-5).all()
    assert history["epsilon_rdp"].is_monotonic_increasing


def test_a_resumed_dp_run_continues_exactly_with_its_budget(tmp_path, digits):
    def build():
        config = FedConfig(fraction=0.5, batch_size=64, dp_max_grad_norm=1.0, dp_noise_multiplier=1.0)
        agg = DPFedAvg.for_config(config, 4, clip=2.0, noise_multiplier=0.5, generator=torch.Generator().manual_seed(1),
                                  accountants=("rdp",))
        return FederatedAveraging(mlp(), data.partition(digits, 4), config=config, aggregator=agg,
                                  monitors=[LocalDPAccountant(accountants=("rdp",))])

    straight = build()
    straight.fit(rounds=2)
    first = build()
    first.fit(rounds=1)
    first.save(tmp_path / "run.pt")
    resumed = build()
    resumed.load(tmp_path / "run.pt")
    resumed.fit(rounds=1)
    assert torch.equal(resumed.weights, straight.weights)
    for column in ("epsilon_rdp", "client_epsilon_rdp"):
        assert resumed.history[column].tolist() == straight.history[column].tolist()


@pytest.mark.parametrize("settings, message", [
    ({"dp_max_grad_norm": -1.0}, "dp_max_grad_norm must be a non-negative number"),
    ({"dp_max_grad_norm": 1.0, "dp_noise_multiplier": -0.5}, "dp_noise_multiplier must be a non-negative number"),
    ({"dp_noise_multiplier": 1.0}, "needs dp_max_grad_norm > 0"),
    ({"dp_max_grad_norm": 1.0, "mu": 0.1}, "does not combine with the FedProx term"),
])
def test_bad_dp_settings_are_refused_by_name(settings, message):
    with pytest.raises(ValueError, match=message):
        FedConfig(**settings)


@pytest.mark.parametrize("kwargs, message", [
    ({"clip": -1.0}, "clip must be a positive number"),
    ({"noise_multiplier": -0.1}, "noise_multiplier must be a non-negative number"),
    ({"clients_per_round": 9}, "exceeds total_clients"),
    ({"generator": None}, "pass generator="),
    ({"delta": 1.5}, "delta"),
])
def test_bad_dp_fedavg_arguments_are_refused_by_name(kwargs, message):
    args = {"clip": 1.0, "noise_multiplier": 1.0, "clients_per_round": 2, "total_clients": 8,
            "generator": torch.Generator(), **kwargs}
    with pytest.raises(ValueError, match=message):
        DPFedAvg(**args)


def test_refused_updates_leave_dp_fedavg_as_it_was():
    agg = DPFedAvg(clip=1.0, noise_multiplier=1.0, clients_per_round=2, total_clients=8,
                   generator=torch.Generator().manual_seed(0), accountants=("rdp",))
    agg(torch.ones(2, 5))
    before = (agg.generator.get_state(), list(agg.accountant.history), agg.rounds)
    with pytest.raises(ValueError, match="received 3 updates but was built for 2"):
        agg(torch.ones(3, 5))
    with pytest.raises(ValueError, match="NaN/Inf in row"):
        agg(torch.tensor([[1.0, float("nan")]]))
    assert torch.equal(agg.generator.get_state(), before[0])
    assert (agg.accountant.history, agg.rounds) == (before[1], before[2])


def test_noise_without_a_generator_and_batch_statistics_are_refused(clients16, digits):
    model = mlp()
    plan = plan_round(clients16, fraction=1.0, dropout=0.0, epochs=1, generator=torch.Generator())
    config = FedConfig(batch_size=16, dp_max_grad_norm=1.0, dp_noise_multiplier=1.0)
    for executor in (SequentialExecutor(), VectorizedExecutor()):
        with pytest.raises(ValueError, match="pass generator="):
            executor.train(model, flat_state(model), clients16, plan, config)
    bn = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    with pytest.raises(ValueError, match="mixes the samples of a batch"):
        FederatedAveraging(bn, data.partition(digits, 4), config=config)
    with pytest.raises(ValueError, match="dp_max_grad_norm 0"):
        FederatedAveraging(mlp(), data.partition(digits, 4), monitors=[LocalDPAccountant()])


def test_an_accountant_built_for_another_run_is_refused_when_the_protocol_is_built(digits):
    config = FedConfig(fraction=0.5, dp_max_grad_norm=1.0)
    agg = DPFedAvg.for_config(config, 10, clip=1.0, noise_multiplier=1.0, generator=torch.Generator())
    with pytest.raises(ValueError, match="built for 5 of 10 clients per round, but this run samples 2 of 4"):
        FederatedAveraging(mlp(), data.partition(digits, 4), config=config, aggregator=agg)
    accountant = LocalDPAccountant()
    FederatedAveraging(mlp(), data.partition(digits, 4), config=config, monitors=[accountant])
    with pytest.raises(ValueError, match="already follows a run"):
        FederatedAveraging(mlp(), data.partition(digits, 4), config=config, monitors=[accountant])


def test_a_per_sample_dp_run_reports_client_epsilon_without_being_asked(digits):
    config = FedConfig(dp_max_grad_norm=1.0, dp_noise_multiplier=1.0, fraction=0.5)
    fl = FederatedAveraging(mlp(), data.partition(digits, 4), config=config)
    history = fl.fit(rounds=2)
    assert {"client_epsilon_rdp", "client_epsilon_prv", "client_delta"} <= set(history.columns)
    assert 0 < history["client_epsilon_rdp"].iloc[0] < history["client_epsilon_rdp"].iloc[1] < math.inf
    assert sum(isinstance(m, LocalDPAccountant) for m in fl.monitors) == 1


@pytest.mark.parametrize("protocol", [FedAsync, FedBuff])
def test_asynchronous_protocols_refuse_per_sample_dp_they_cannot_account(digits, protocol):
    config = FedConfig(dp_max_grad_norm=1.0, dp_noise_multiplier=1.0)
    with pytest.raises(ValueError, match="does not account per-sample DP"):
        protocol(mlp(), data.partition(digits, 4), config=config)
