"""Side channels: the server's transcript lists clients in arrival order unless Shuffled hides it."""
import pytest
import torch
from scipy import stats

from defenses.side_channels import Shuffled
from toolkit import data, models
from toolkit.federated import FedConfig, FederatedAveraging
from toolkit.federated.wire_aggregation import Aggregate, PlainSum, Uploads, WireAggregator
from toolkit.wire import Wire

N, ROUNDS = 6, 200
NAMES = tuple(f"client:{i}" for i in range(N))
COUNTS = torch.tensor([30.0, 120, 55, 80, 10, 200], dtype=torch.float64)  # sample counts


def _round_uploads(r, g):
    """One round as the engine hands it over: times = sample count x a random slowdown, sorted."""
    times = COUNTS * (1 + 0.1 * torch.rand(N, generator=g, dtype=torch.float64))
    uploads = Uploads(torch.randn(N, 3, generator=g), NAMES, COUNTS, times, r, g)
    return uploads.subset(torch.argsort(uploads.times, stable=True))


def _transcript_orders(aggregator, seed=0):
    """Per round: the client's times, and the senders in the order the server's transcript lists them."""
    g, wire, times = torch.Generator().manual_seed(seed), Wire(), []
    for r in range(1, ROUNDS + 1):
        wire.tick()
        uploads = _round_uploads(r, g)
        times.append(dict(zip(uploads.names, uploads.times.tolist())))
        aggregator.over_wire(wire, uploads)
    orders = {}
    for t in wire.observed(by="server", kind="update"):
        orders.setdefault(t.step, []).append(t.sender)
    return times, [orders[s] for s in sorted(orders)]


def test_without_shuffling_the_transcript_sorts_by_the_clients_times():
    times, orders = _transcript_orders(PlainSum())
    assert len(orders) == ROUNDS
    for t, order in zip(times, orders):
        assert order == sorted(NAMES, key=t.get)
        assert stats.kendalltau([t[n] for n in order], range(N)).statistic == pytest.approx(1.0)


def test_with_shuffling_each_clients_position_is_uniform():
    times, orders = _transcript_orders(Shuffled(PlainSum()))
    positions = torch.zeros(N, N)  # (client, position) counts over the rounds
    taus = []
    for t, order in zip(times, orders):
        assert sorted(order) == sorted(NAMES)
        for pos, name in enumerate(order):
            positions[NAMES.index(name), pos] += 1
        taus.append(stats.kendalltau([t[n] for n in order], range(N)).statistic)
    # Uniform positions: the table's chi-square statistic is ~ chi2((N-1)^2) (rows and columns both
    # sum to ROUNDS); the seeded run must lie below its 0.999 quantile (52.6 for 25 dof)
    expected = ROUNDS / N
    chi2 = float(((positions - expected) ** 2 / expected).sum())
    assert chi2 < stats.chi2.ppf(0.999, (N - 1) ** 2)
    # Kendall's tau between arrival position and the client's time: 0 in expectation, variance
    # 2(2N+5) / (9N(N-1)) = 0.126 per round for independent orders, so the mean over 200 rounds has
    # std 0.025; 4 std = 0.1 (without shuffling it is exactly 1)
    sd = (2 * (2 * N + 5) / (9 * N * (N - 1)) / ROUNDS) ** 0.5
    assert abs(sum(taus) / ROUNDS) < 4 * sd


def _recording(log):
    class Recording(WireAggregator):
        def over_wire(self, wire, uploads):
            log.append(uploads)
            return PlainSum().over_wire(wire, uploads)
    return Recording()


def test_the_inner_sees_every_client_arrive_at_one_random_deadline():
    log, g = [], torch.Generator().manual_seed(0)
    agg = Shuffled(_recording(log), jitter=0.25)
    deadlines = []
    for r in range(1, 51):
        uploads = _round_uploads(r, g)
        report = agg.over_wire(Wire(), uploads).report
        seen = log[-1].times
        latest = float(uploads.times.max())
        assert torch.equal(seen, torch.full_like(seen, report["shuffle_deadline"]))
        assert latest <= report["shuffle_deadline"] <= latest * 1.25
        assert report["shuffle_delay"] == pytest.approx(report["shuffle_deadline"] - latest)
        assert report["shuffle_wait_max"] == pytest.approx(report["shuffle_deadline"] - float(uploads.times.min()))
        assert report["shuffle_wait_mean"] == pytest.approx(float((report["shuffle_deadline"] - uploads.times).mean()))
        deadlines.append(report["shuffle_delay"] / latest)
        # the shuffled rows still pair each client with its own update and weight
        index = [uploads.names.index(n) for n in log[-1].names]
        assert torch.equal(log[-1].updates, uploads.updates[index])
        assert torch.equal(log[-1].weights, uploads.weights[index])
    assert len(set(deadlines)) == 50 and max(deadlines) > 0.2  # a random delay, up to jitter
    log.clear()
    Shuffled(_recording(log), jitter=0.0).over_wire(Wire(), _round_uploads(1, g))
    assert (log[-1].times == log[-1].times.max()).all()


def test_shuffling_leaves_the_aggregate_and_repeats_for_a_seed():
    g = torch.Generator().manual_seed(3)
    uploads = _round_uploads(1, g)
    plain = PlainSum().over_wire(Wire(), uploads)
    orders = []
    for seed in (0, 0, 1):
        u = Uploads(uploads.updates, uploads.names, uploads.weights, uploads.times, 1,
                    torch.Generator().manual_seed(seed))
        wire = Wire()
        result = Shuffled(PlainSum()).over_wire(wire, u)
        assert torch.allclose(result.update, plain.update, atol=1e-6)
        assert sorted(result.included) == sorted(plain.included)
        orders.append([t.sender for t in wire.observed(by="server")])
    assert orders[0] == orders[1] != orders[2]


def test_in_the_engine_the_transcript_order_is_the_sample_counts_order_unless_shuffled():
    clients = data.partition(data.load("digits"), 5, scheme="dirichlet", alpha=0.5, seed=1)
    runs = {}
    for name, agg in {"plain": PlainSum(), "shuffled": Shuffled(PlainSum())}.items():
        torch.manual_seed(0)
        fl = FederatedAveraging(models.mlp([64, 16, 10]), clients, config=FedConfig(seed=0), aggregator=agg)
        history = fl.fit(rounds=1)
        runs[name] = fl, history
    fl, history = runs["plain"]
    order = [t.sender for t in fl.wire.observed(by="server", kind="update")]
    counts = {n: int(c) for n, c in zip(fl.data.names, fl.data.counts)}
    assert order == sorted(order, key=counts.get) and len(set(counts.values())) == 5
    shuffled, h = runs["shuffled"]
    assert [t.sender for t in shuffled.wire.observed(by="server", kind="update")] != order
    assert torch.allclose(fl.weights, shuffled.weights, atol=1e-6)  # the same mean
    assert h["shuffle_deadline"].iloc[0] >= max(counts.values())
    assert h.attrs["manifest"]["aggregation"]["inner"] == {"protocol": "plain", "version": 1}
    assert h.attrs["manifest"]["aggregation"]["jitter"] == 0.1


def test_a_stateful_inner_is_checkpointed_and_reported_through_the_wrapper():
    class Counting(WireAggregator):
        def __init__(self):
            self.rounds = 0

        def over_wire(self, wire, uploads):
            self.rounds += 1
            return Aggregate(uploads.updates.mean(0), uploads.names, 0, 0)

        def report(self):
            return {"rounds_seen": self.rounds}

        def state_dict(self):
            return {"rounds": self.rounds}

        def load_state_dict(self, state):
            self.rounds = state["rounds"]
    inner = Counting()
    agg = Shuffled(inner)
    agg.over_wire(Wire(), _round_uploads(1, torch.Generator().manual_seed(0)))
    assert agg.report() == {"rounds_seen": 1} and agg.state_dict() == {"rounds": 1}
    agg.load_state_dict({"rounds": 7})
    assert inner.rounds == 7
    assert Shuffled(PlainSum()).state_dict is None  # nothing to checkpoint


@pytest.mark.parametrize("jitter", [-0.1, float("nan"), float("inf"), True, "0.1"])
def test_bad_arguments_are_clear_errors(jitter):
    with pytest.raises(ValueError, match="jitter"):
        Shuffled(PlainSum(), jitter=jitter)


def test_a_non_wire_inner_is_a_clear_error():
    with pytest.raises(ValueError, match="wraps a WireAggregator"):
        Shuffled("mean")
