"""Cohorts: hierarchical aggregation over random cohorts, combined by included sample counts."""
import pytest
import torch

from defenses.cohorts import Cohorts, partition
from toolkit import data, models
from toolkit.federated import FedConfig, FederatedAveraging
from toolkit.federated.wire_aggregation import Aggregate, PlainSum, Uploads, WireAggregator
from toolkit.wire import Wire


def _uploads(n=23, p=7, seed=0, round=1):
    g = torch.Generator().manual_seed(seed)
    updates = torch.randn(n, p, generator=g)
    weights = torch.randint(1, 50, (n,), generator=g).double()
    times = torch.rand(n, generator=g, dtype=torch.float64)
    order = torch.argsort(times)  # the engine hands them over in arrival order
    return Uploads(updates, tuple(f"c{i}" for i in range(n)), weights, times, round, g).subset(order)


def _flat_mean(uploads, names=None):
    keep = [i for i, n in enumerate(uploads.names) if names is None or n in names]
    w = uploads.weights[keep]
    return w @ uploads.updates[keep].double() / w.sum()


def _recorder(log, *, fail_on=None, drop=None, report=None):
    """A PlainSum that records the uploads it is handed; it can fail, drop a client, or report."""
    class Recording(WireAggregator):
        name = "recording"

        def over_wire(self, wire, uploads):
            log.append(uploads)
            if fail_on in uploads.names:
                raise ValueError(f"client {fail_on} did not open its commitment")
            keep = torch.tensor([i for i, n in enumerate(uploads.names) if n != drop], dtype=torch.long)
            result = PlainSum().over_wire(wire, uploads.subset(keep))
            extra = report(uploads) if report is not None else {}
            return Aggregate(result.update, result.included, result.bytes_up, 0, extra)

        def manifest(self):
            return {"protocol": "recording", "version": 0}
    return Recording


@pytest.mark.parametrize("n,size", [(23, 5), (10, 3), (4, 2), (7, 7), (3, 10)])
def test_the_combined_update_equals_the_flat_weighted_mean(n, size):
    for seed in range(5):
        uploads = _uploads(n, seed=seed)
        result = Cohorts(PlainSum, size=size).over_wire(Wire(), uploads)
        assert torch.allclose(result.update.double(), _flat_mean(uploads), atol=1e-6)
        assert sorted(result.included) == sorted(uploads.names)


def test_every_client_is_in_exactly_one_cohort_of_at_least_size():
    for n, size in [(23, 5), (10, 3), (9, 2), (3, 10), (40, 7)]:
        log = []
        uploads = _uploads(n)
        result = Cohorts(_recorder(log), size=size).over_wire(Wire(), uploads)
        names = [name for part in log for name in part.names]
        assert sorted(names) == sorted(uploads.names) and len(names) == len(set(names))
        sizes = [len(part.names) for part in log]
        assert len(log) == max(1, n // size) == result.report["cohorts"]
        assert min(sizes) >= min(size, n) and max(sizes) - min(sizes) <= 1
        assert (result.report["cohort_min"], result.report["cohort_max"]) == (min(sizes), max(sizes))


def test_within_a_cohort_the_clients_keep_their_arrival_order():
    log = []
    Cohorts(_recorder(log), size=4).over_wire(Wire(), _uploads(20))
    for part in log:
        assert torch.equal(part.times, torch.sort(part.times).values)


def _cohorts_of(seed, rounds=3):
    log, out = [], []
    agg = Cohorts(_recorder(log), size=3)
    g = torch.Generator().manual_seed(seed)
    base = _uploads(12)
    for r in range(1, rounds + 1):
        log.clear()
        agg.over_wire(Wire(), Uploads(base.updates, base.names, base.weights, base.times, r, g))
        out.append(sorted(tuple(sorted(part.names)) for part in log))
    return out


def test_cohorts_differ_between_rounds_and_repeat_for_the_same_seed():
    first = _cohorts_of(0)
    assert first == _cohorts_of(0)
    assert len({tuple(r) for r in first}) == 3  # three rounds, three different partitions
    assert first != _cohorts_of(1)


def test_partition_is_uniform_over_pairs():
    # each pair of 6 clients shares a cohort of 3 (2 cohorts) with probability 2/5 under a uniform partition
    g = torch.Generator().manual_seed(0)
    together = torch.zeros(6, 6)
    trials = 2000
    for _ in range(trials):
        for c in partition(6, 3, g):
            together[c[:, None], c[None, :]] += 1
    off = together[~torch.eye(6, dtype=torch.bool)] / trials
    # binomial std sqrt(0.4 * 0.6 / 2000) = 0.011: 4 std
    assert (off - 0.4).abs().max() < 0.045


@pytest.mark.parametrize("size", [0, 1, -3, 2.5, True, "4", None])
def test_a_bad_size_is_a_clear_error(size):
    with pytest.raises(ValueError, match="size"):
        Cohorts(PlainSum, size=size)


def test_a_bad_inner_factory_is_a_clear_error():
    with pytest.raises(ValueError, match="make_inner must be a callable"):
        Cohorts(PlainSum(), size=3)
    with pytest.raises(ValueError, match="must return a WireAggregator"):
        Cohorts(lambda: "mean", size=3)


def test_a_failed_cohort_names_the_cohort_and_its_clients_and_releases_nothing():
    log = []
    uploads = _uploads(12)
    with pytest.raises(ValueError, match=r"cohort \d of 4 \(clients \[.*'c5'.*\]\) failed, nothing released: "
                                         r"client c5 did not open"):
        Cohorts(_recorder(log, fail_on="c5"), size=3).over_wire(Wire(), uploads)


def test_a_failed_cohort_leaves_the_engine_weights_unchanged():
    clients = data.partition(data.load("digits"), 6, seed=0)
    torch.manual_seed(0)
    fl = FederatedAveraging(models.mlp([64, 16, 10]), clients, config=FedConfig(seed=0),
                            aggregator=Cohorts(_recorder([], fail_on="client:2"), size=2))
    before = fl.weights.clone()
    with pytest.raises(ValueError, match="cohort .*'client:2'.* failed, nothing released"):
        fl.fit(rounds=1)
    assert torch.equal(fl.weights, before)


def test_a_client_the_inner_leaves_out_is_out_of_the_weights_too():
    uploads = _uploads(12)
    result = Cohorts(_recorder([], drop="c4"), size=3).over_wire(Wire(), uploads)
    assert "c4" not in result.included and len(result.included) == 11
    assert torch.allclose(result.update.double(), _flat_mean(uploads, set(result.included)), atol=1e-6)


def test_an_inner_that_includes_a_stranger_is_refused():
    class Liar(WireAggregator):
        def over_wire(self, wire, uploads):
            return Aggregate(uploads.updates[0], uploads.names + ("mallory",), 0, 0)
    with pytest.raises(ValueError, match="cohort 0: .*mallory.*not distinct clients of the cohort"):
        Cohorts(Liar, size=3).over_wire(Wire(), _uploads(6))


def test_reports_are_merged_over_cohorts():
    def report(uploads):
        return {"secagg_dropped_masked": 1, "server_seconds": 0.25, "ring_bits": 20, "n": len(uploads.names),
                "secagg_clipped": 0.5 / len(uploads.names), "secagg_bytes_share": 10 * len(uploads.names)}
    result = Cohorts(_recorder([], report=report), size=3).over_wire(Wire(), _uploads(10))  # cohorts of 4, 3, 3
    rep = result.report
    assert rep["secagg_dropped_masked"] == 3 and rep["ring_bits"] == 20 and sorted(rep["n"]) == [3, 3, 4]
    assert rep["secagg_bytes_share"] == 100 and sorted(rep["secagg_clipped"]) == [0.125, 0.5 / 3, 0.5 / 3]
    assert rep["server_seconds"] == pytest.approx(0.75 + rep["cohorts_combine_seconds"])
    assert rep["cohorts_seconds"] > 0


def test_federated_training_with_cohorts_matches_flat_aggregation_and_records_the_manifest():
    clients = data.partition(data.load("digits"), 6, seed=0)
    runs = {}
    for name, agg in {"flat": PlainSum(), "cohorts": Cohorts(PlainSum, size=2)}.items():
        torch.manual_seed(0)
        fl = FederatedAveraging(models.mlp([64, 16, 10]), clients, config=FedConfig(seed=0), aggregator=agg)
        runs[name] = (fl, fl.fit(rounds=1), fl.weights.clone(), fl.fit(rounds=1))
    # round 1: the same updates, the same mean (the partition then draws from the protocol generator,
    # so round 2 trains on other batches)
    (_, h_flat, w_flat, _), (_, h_coh, w_coh, h_coh2) = runs["flat"], runs["cohorts"]
    assert torch.allclose(w_flat, w_coh, atol=1e-6)
    assert h_coh["bytes_up"].tolist() == h_flat["bytes_up"].tolist()  # plain cohorts cost nothing extra
    assert h_coh["cohorts"].tolist() == h_coh2["cohorts"].tolist() == [3] and (h_coh2["cohorts_seconds"] > 0).all()
    assert h_coh.attrs["manifest"]["aggregation"]["size"] == 2
    assert h_coh.attrs["manifest"]["aggregation"]["inner"] == {"protocol": "plain", "version": 1}
