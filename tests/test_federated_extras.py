"""Federated extras: compression on the wire, robust aggregation under attack, asynchronous
training with stragglers, and exact checkpoint/resume."""
import pytest
import torch

from attacks.poisoning import ScaledUpdate, SignFlip
from toolkit import data, models
from toolkit.federated import FedConfig, FederatedAveraging
from toolkit.federated.asynchronous import FedAsync, FedBuff, StragglerDelays
from toolkit.federated.compression import QSGD, TopK


def mlp():
    torch.manual_seed(0)
    return models.mlp([64, 128, 10])


# -- compression ------------------------------------------------------------------------------
def test_topk_one_percent_with_error_feedback_matches_fedavg_at_fifty_times_fewer_bytes(iid10):
    config = FedConfig(lr=0.5, local_epochs=2, record=False)
    dense = FederatedAveraging(mlp(), iid10, config=config).fit(rounds=40)
    sparse = FederatedAveraging(mlp(), iid10, config=config, compressor=TopK(0.01)).fit(rounds=40)
    assert sparse["accuracy"].iloc[-1] >= dense["accuracy"].iloc[-1] - 0.01, (dense.tail(3), sparse.tail(3))
    assert dense["bytes_up"].sum() / sparse["bytes_up"].sum() >= 50
    assert (sparse["bytes_down"] == dense["bytes_down"]).all()  # the download stays dense


def test_compressed_updates_are_what_the_transcript_holds(iid10):
    fl = FederatedAveraging(mlp(), iid10, compressor=QSGD(levels=4))
    history = fl.fit(rounds=2)
    sent = fl.wire.observed(by="server", kind="update")
    assert len(sent) == 20 and all(type(t.tensor).__name__ == "QuantizedPacket" for t in sent)
    assert history["bytes_up"].sum() == sum(t.nbytes for t in sent)
    assert sent[0].tensor.decode().shape == fl.weights.shape


@pytest.mark.parametrize("make", [lambda: TopK(0.01), lambda: QSGD(levels=4)], ids=["topk", "qsgd"])
def test_a_nan_update_is_dropped_before_compression_with_a_warning(iid10, make):
    def poison(updates, *, generator=None):
        return updates * float("nan")

    compressor = make()
    fl = FederatedAveraging(mlp(), iid10, config=FedConfig(lr=0.5), compressor=compressor, malicious={2: poison})
    with pytest.warns(RuntimeWarning, match=r"dropped non-finite .*client:2"):
        history = fl.fit(rounds=3)
    assert history["rejected"].tolist() == [1, 1, 1] and torch.isfinite(fl.weights).all()
    sent = fl.wire.observed(by="server", kind="update")
    assert len(sent) == 3 * 9 and "client:2" not in {t.sender for t in sent}  # it never crossed
    assert history["bytes_up"].sum() == sum(t.nbytes for t in sent)
    assert history["accuracy"].iloc[-1] > 0.5
    alone = FederatedAveraging(mlp(), iid10[:1], config=FedConfig(lr=0.5), compressor=make(), malicious={0: poison})
    before = alone.weights.clone()
    with pytest.warns(RuntimeWarning, match="client:0"):
        row = alone.fit(rounds=1).iloc[0]
    assert row["rejected"] == 1 and row["bytes_up"] == 0 and torch.equal(alone.weights, before)


# -- robust aggregation -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def attacked(iid10):
    """Three of ten clients flip and scale their updates; four aggregators, 15 rounds each."""
    attackers = {0: SignFlip(scale=4.0), 1: SignFlip(scale=4.0), 2: ScaledUpdate(-6.0)}
    results = {}
    for name, aggregator in [("mean", "mean"), ("median", "median"), ("trimmed", "trimmed_mean"),
                             ("krum", "multi_krum")]:
        from toolkit.federated import make_aggregator
        agg = make_aggregator(aggregator, f=3) if aggregator in ("trimmed_mean", "multi_krum") else aggregator
        fl = FederatedAveraging(mlp(), iid10, config=FedConfig(lr=0.3, record=False), aggregator=agg,
                                malicious=attackers)
        results[name] = fl.fit(rounds=15)["accuracy"].iloc[-1]
    return results


def test_robust_aggregators_keep_learning_when_the_mean_breaks(attacked):
    assert attacked["mean"] < 0.5, attacked
    for name in ("median", "trimmed", "krum"):
        assert attacked[name] > 0.85, attacked


# -- asynchronous -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stragglers(digits):
    clients = data.partition(digits, 20, "iid", seed=0)
    delays = StragglerDelays(20, slow_fraction=0.2, slow_factor=10.0, seed=0)
    config = FedConfig(lr=0.3, fraction=0.5, record=False, seed=0)
    runs = {
        "fedavg": FederatedAveraging(mlp(), clients, config=config, delays=delays).fit(rounds=30),
        "fedbuff": FedBuff(mlp(), clients, config=config, delays=delays, buffer_size=5).fit(rounds=60),
        "fedasync": FedAsync(mlp(), clients, config=config, delays=delays, alpha=0.6).fit(rounds=300),
    }
    return runs


def time_to(history, target):
    hit = history[history["accuracy"] >= target]
    return float(hit["time"].iloc[0]) if len(hit) else float("inf")


@pytest.mark.parametrize("name", ["fedbuff", "fedasync"])
def test_async_reaches_the_target_no_later_than_synchronous_fedavg(stragglers, name):
    target = 0.9
    sync = time_to(stragglers["fedavg"], target)
    assert sync < float("inf"), stragglers["fedavg"].tail()
    assert time_to(stragglers[name], target) <= sync, (name, time_to(stragglers[name], target), sync)


def test_async_history_tracks_time_and_staleness(stragglers):
    for name in ("fedbuff", "fedasync"):
        h = stragglers[name]
        assert h["time"].is_monotonic_increasing and (h["staleness"].dropna() >= 0).all()
    assert (stragglers["fedbuff"]["clients"] == 5).all()  # one server step per five arrivals
    assert (stragglers["fedasync"]["clients"] == 1).all()


def test_fedasync_staleness_functions_and_bad_settings(iid10):
    from toolkit.federated.asynchronous import STALENESS
    assert STALENESS["polynomial"](3, 0.5, 0) == pytest.approx(0.5)
    assert STALENESS["hinge"](2, 1.0, 4) == 1.0 and STALENESS["hinge"](6, 1.0, 4) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="alpha must lie in"):
        FedAsync(mlp(), iid10, alpha=0.0)
    with pytest.raises(ValueError, match="unknown staleness function"):
        FedAsync(mlp(), iid10, staleness="linear")
    with pytest.raises(ValueError, match="buffer_size must be a positive int"):
        FedBuff(mlp(), iid10, buffer_size=0)
    with pytest.raises(ValueError, match="concurrency must lie in 1..10"):
        FedBuff(mlp(), iid10, concurrency=11)


# -- checkpoint and resume --------------------------------------------------------------------
BUILDERS = {
    "fedavg": lambda clients: FederatedAveraging(
        mlp(), clients, config=FedConfig(fraction=0.5, dropout=0.1, server_optimizer="fedadam", server_lr=0.01),
        compressor=TopK(0.1)),
    "fedavgm": lambda clients: FederatedAveraging(
        mlp(), clients, config=FedConfig(fraction=0.5, server_optimizer="fedavgm", server_lr=0.5),
        compressor=QSGD(levels=4, error_feedback=True)),
    "fedbuff": lambda clients: FedBuff(mlp(), clients, config=FedConfig(fraction=0.5), buffer_size=3),
    "fedasync": lambda clients: FedAsync(mlp(), clients, config=FedConfig(fraction=0.5, dropout=0.2)),
}


def batches(fl):
    """For each queued task, the position of its batch among the distinct batches (shared or not)."""
    seen = {}
    return [seen.setdefault(id(t.batch), len(seen)) for t in fl._queue]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_run_interrupted_after_round_two_resumes_exactly(tmp_path, iid10, name):
    build = BUILDERS[name]
    full = build(iid10)
    whole = full.fit(rounds=4)
    first = build(iid10)
    first.fit(rounds=2)
    first.save(tmp_path / "run.pt")
    state = torch.load(tmp_path / "run.pt", weights_only=True)  # tensors and plain data only: no pickled object
    assert state["format"] == "leaklab-federated-2"
    resumed = build(iid10)
    resumed.load(tmp_path / "run.pt")
    if hasattr(first, "_queue"):  # tasks dispatched together still share one batch
        assert batches(resumed) == batches(first)
    rest = resumed.fit(rounds=2)
    assert torch.equal(full.weights, resumed.weights)
    cols = [c for c in whole.columns if c != "seconds"]
    assert whole[cols].iloc[2:].reset_index(drop=True).equals(rest[cols].reset_index(drop=True))
    assert resumed.history[cols].equals(full.history[cols])
    assert torch.equal(full.generator.get_state(), resumed.generator.get_state())
    assert resumed.wire.total_bytes == full.wire.total_bytes
    assert len(resumed.wire.observed()) == len(full.wire.observed())
    if full.compressor is not None:  # the error-feedback memory carried over
        assert torch.equal(full.compressor.residual, resumed.compressor.residual)
    if hasattr(full, "server_optimizer"):  # FedAdam's moments, FedAvgM's velocity
        mine, theirs = full.server_optimizer.state_dict(), resumed.server_optimizer.state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_load_refuses_a_mismatch_and_keeps_the_file(tmp_path, iid10):
    fl = FederatedAveraging(mlp(), iid10)
    fl.fit(rounds=1)
    path = fl.save(tmp_path / "run.pt")
    size = path.stat().st_size
    with pytest.raises(ValueError, match="mismatched parameter shapes"):
        FederatedAveraging(models.mlp([64, 32, 10]), iid10).load(path)
    with pytest.raises(ValueError, match=r"config differs in \['lr'\]"):
        FederatedAveraging(mlp(), iid10, config=FedConfig(lr=0.2)).load(path)
    with pytest.raises(ValueError, match="FedBuff"):
        FedBuff(mlp(), iid10).load(path)
    with pytest.raises(ValueError, match="no checkpoint at"):
        fl.load(tmp_path / "missing.pt")
    assert path.stat().st_size == size
    fresh = FederatedAveraging(mlp(), iid10)
    fresh.load(path)  # the file survived the refusals
    assert torch.equal(fresh.weights, fl.weights)
