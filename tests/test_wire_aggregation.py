"""The WireAggregator hook: an aggregation that sends its own messages replaces the plain upload."""
import pytest
import torch

from toolkit import data, models
from toolkit.federated import FedConfig, FederatedAveraging
from toolkit.federated.asynchronous import FedAsync
from toolkit.federated.compression import TopK
from toolkit.federated.wire_aggregation import Aggregate, PlainSum, Uploads, WireAggregator
from toolkit.wire import Wire


@pytest.fixture(scope="module")
def digits():
    return data.partition(data.load("digits"), 5, seed=0)


def _run(clients, aggregator, rounds=2, wire=None, **config):
    torch.manual_seed(0)
    fl = FederatedAveraging(models.mlp([64, 16, 10]), clients, config=FedConfig(seed=0, **config),
                            aggregator=aggregator, wire=wire)
    return fl, fl.fit(rounds=rounds)


def test_plain_sum_trains_exactly_as_the_engine_upload(digits):
    plain, h1 = _run(digits, "mean")
    wired, h2 = _run(digits, PlainSum())
    assert torch.allclose(plain.weights, wired.weights, atol=1e-6)
    assert h1["bytes_up"].tolist() == h2["bytes_up"].tolist()
    assert h2["accuracy"].tolist() == pytest.approx(h1["accuracy"].tolist())


def test_a_transform_on_the_update_changes_what_the_server_aggregates(digits):
    halve = lambda t, *, kind: t * 0.5 if kind == "update" else t  # noqa: E731
    plain, _ = _run(digits, PlainSum(), rounds=1)
    halved, _ = _run(digits, PlainSum(), rounds=1, wire=Wire([halve]))
    torch.manual_seed(0)
    start = FederatedAveraging(models.mlp([64, 16, 10]), digits, config=FedConfig(seed=0)).weights
    assert torch.allclose(halved.weights - start, 0.5 * (plain.weights - start), atol=1e-6)


def test_manifest_records_the_aggregation_protocol(digits):
    fl, history = _run(digits, PlainSum(), rounds=1)
    assert history.attrs["manifest"]["aggregation"] == {"protocol": "plain", "version": 1}
    fl2, h2 = _run(digits, "median", rounds=1)
    assert h2.attrs["manifest"]["aggregation"] == {"protocol": "median"}


def test_a_client_with_a_nan_update_does_not_take_part(digits):
    poison = {1: lambda u, generator=None: torch.full_like(u, float("nan"))}
    torch.manual_seed(0)
    fl = FederatedAveraging(models.mlp([64, 16, 10]), digits, config=FedConfig(seed=0),
                            aggregator=PlainSum(), malicious=poison)
    with pytest.warns(RuntimeWarning, match="client:1|non-finite"):
        history = fl.fit(rounds=1)
    assert history["rejected"].iloc[0] == 1 and torch.isfinite(fl.weights).all()
    assert all(t.sender != fl.data.names[1] for t in fl.wire.observed(by="server"))


def test_wire_aggregators_refuse_what_they_cannot_run(digits):
    with pytest.raises(ValueError, match="compressor"):
        FederatedAveraging(models.mlp([64, 16, 10]), digits, aggregator=PlainSum(), compressor=TopK(0.1))
    with pytest.raises(ValueError, match="FederatedAveraging, not FedAsync"):
        FedAsync(models.mlp([64, 16, 10]), digits, aggregator=PlainSum())
    with pytest.raises(TypeError, match="over the Wire"):
        PlainSum()(torch.zeros(2, 3))


def test_uploads_refuse_duplicate_ids_and_mismatched_shapes():
    g = torch.Generator()
    with pytest.raises(ValueError, match=r"duplicate client ids \['a'\]"):
        Uploads(torch.zeros(2, 3), ("a", "a"), torch.ones(2, dtype=torch.float64), torch.ones(2), 1, g)
    with pytest.raises(ValueError, match="weights"):
        Uploads(torch.zeros(2, 3), ("a", "b"), torch.ones(3, dtype=torch.float64), torch.ones(2), 1, g)


def test_an_aggregate_that_includes_nobody_leaves_the_weights(digits):
    class Nobody(WireAggregator):
        def over_wire(self, wire, uploads):
            return Aggregate(torch.full((uploads.updates.shape[1],), 9.0), (), 0, 0, {"why": 1})

    torch.manual_seed(0)
    fl = FederatedAveraging(models.mlp([64, 16, 10]), digits, config=FedConfig(seed=0), aggregator=Nobody())
    before = fl.weights.clone()
    history = fl.fit(rounds=1)
    assert torch.equal(fl.weights, before) and history["why"].iloc[0] == 1
    assert history["rejected"].iloc[0] == history["clients"].iloc[0]
