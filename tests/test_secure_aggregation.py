"""SecureAggregation / SecAggPlus as FederatedAveraging's aggregation: the weighted mean, training as plain
FedAvg does, dropouts from the engine's generator, failed rounds leaving the weights, the manifest."""
import pytest
import torch

from defenses.secagg.protocol import STAGES
from defenses.secure_aggregation import SecAggPlus, SecureAggregation
from toolkit import data, models
from toolkit.federated import FedConfig, FederatedAveraging
from toolkit.federated.wire_aggregation import Uploads
from toolkit.wire import Wire


@pytest.fixture(scope="module")
def clients():
    return data.partition(data.load("digits"), 6, seed=0)


def _fl(clients, aggregator, wire=None):
    torch.manual_seed(0)
    return FederatedAveraging(models.mlp([64, 32, 10]), clients, aggregator=aggregator, wire=wire,
                              config=FedConfig(seed=0, lr=0.2, local_epochs=2))


def _uploads(m=7, d=40, seed=0, round=1):
    g = torch.Generator().manual_seed(seed)
    updates = (torch.rand(m, d, generator=g) * 1.6 - 0.8).to(torch.float32)
    weights = torch.randint(20, 200, (m,), generator=g).double()
    return Uploads(updates, tuple(f"client:{i}" for i in range(m)), weights, weights.clone(), round,
                   torch.Generator().manual_seed(seed + 1))


def _untimed(report):
    """A round's report without its wall times (they vary from run to run)."""
    return {k: v for k, v in report.items() if not k.endswith("_seconds")}


def _weighted_mean(u, names):
    idx = [u.names.index(n) for n in names]
    w = u.weights[idx]
    return (w @ u.updates[idx].double()) / w.sum(), w


def test_training_with_secure_aggregation_matches_plain_fedavg(clients):
    plain, secure = _fl(clients, "mean"), _fl(clients, SecureAggregation())
    h1, h2 = plain.fit(rounds=5), secure.fit(rounds=5)
    assert h1["accuracy"].iloc[-1] > 0.8  # a task that trains
    assert (h2["accuracy"] - h1["accuracy"]).abs().max() <= 1 / 360 + 1e-12  # at most one test sample apart
    assert h2["secagg_clipped"].max() == 0
    assert torch.allclose(plain.weights, secure.weights, atol=1e-3)  # fixed-point rounding, 5 rounds on
    assert (h2["bytes_up"] < h1["bytes_up"]).all()  # 21-bit packed ring elements beat float32 at d = 2,410
    for s in STAGES:
        assert (h2[f"secagg_bytes_{s}"] > 0).all() and (h2[f"secagg_dropped_{s}"] == 0).all()


def test_the_released_update_is_the_weighted_mean_within_the_encoding_tolerance():
    agg = SecureAggregation(threshold=4, frac=16)
    u = _uploads()
    out = agg.over_wire(Wire(), u)
    mean, w = _weighted_mean(u, u.names)
    a = w / w.max()
    tol = 2.0 ** -16 / float(a.mean()) * 1.01  # the module docstring's bound
    assert (out.update.double() - mean).abs().max() <= tol
    assert out.included == u.names and out.update.dtype == torch.float32
    coarse = SecureAggregation(threshold=4, frac=6).over_wire(Wire(), u)  # the bound is tight enough to fail
    assert (coarse.update.double() - mean).abs().max() > tol


def test_dropouts_come_from_the_generator_and_the_mean_covers_exactly_the_survivors():
    agg = SecureAggregation(threshold=3, dropout={"share": 0.15, "masked": 0.15, "unmask": 0.15})
    runs = [agg.over_wire(Wire(), _uploads(m=10, seed=s)) for s in (4, 4, 5)]
    assert runs[0].included == runs[1].included and torch.equal(runs[0].update, runs[1].update)  # seeded
    assert _untimed(runs[0].report) == _untimed(runs[1].report)
    for s, out in zip((4, 4, 5), runs):
        u = _uploads(m=10, seed=s)
        mean, w = _weighted_mean(u, out.included)
        assert (out.update.double() - mean).abs().max() <= 2.0 ** -16 * float(w.max() / w.mean()) * 1.01
        dropped = sum(out.report[f"secagg_dropped_{st}"] for st in ("share", "masked"))
        assert len(out.included) == 10 - dropped
    assert sum(o.report[f"secagg_dropped_{st}"] for o in runs for st in STAGES) > 0


def test_an_explicit_dropout_schedule_and_the_unopened_commitments():
    agg = SecureAggregation(threshold=3, dropout=lambda u: {"masked": [u.names[1]], "unmask": [u.names[2]]})
    u = _uploads()
    out = agg.over_wire(Wire(), u)
    assert u.names[1] not in out.included and u.names[2] in out.included
    assert out.report["secagg_unopened"] == 1 and out.report["secagg_dropped_unmask"] == 1


def test_clipping_is_reported():
    u = _uploads()
    out = SecureAggregation(threshold=4, bound=0.5).over_wire(Wire(), u)
    assert out.report["secagg_clipped"] == pytest.approx(float((u.updates.abs() > 0.5).float().mean()))
    mean, _ = _weighted_mean(Uploads(u.updates.clamp(-0.5, 0.5), u.names, u.weights, u.times, 1, u.generator), u.names)
    assert (out.update.double() - mean).abs().max() < 1e-4  # the mean of the clipped updates


@pytest.mark.parametrize("make,match", [
    (lambda: (SecureAggregation(threshold=7), Wire()), r"threshold t = 7 is larger than the 6 clients"),
    (lambda: (SecureAggregation(), Wire([_tamper_masked])), r"'client:\d' \(opening does not match its commitment"),
    (lambda: (SecureAggregation(dropout={"masked": 0.95}), Wire()), r"round 2 .*fewer than the threshold")])
def test_a_round_that_cannot_release_leaves_the_federated_weights(clients, make, match):
    agg, wire = make()
    fl = _fl(clients, agg, wire=wire)
    before = fl.weights.clone()
    with pytest.raises(ValueError, match=match):
        fl.fit(rounds=1)
    assert torch.equal(fl.weights, before) and fl.round == 0


def _tamper_masked(t, *, kind):
    if kind != "masked-input":
        return t
    t = t.clone()
    t[3, 5] ^= 1
    return t


def test_secagg_plus_in_training_and_its_manifest(clients):
    many = data.partition(data.load("digits"), 24, seed=0)
    full, plus = _fl(many, SecureAggregation()), _fl(many, SecAggPlus())
    hf, hp = full.fit(rounds=1), plus.fit(rounds=1)
    assert hp["secagg_neighbours"].iloc[0] == 10 and hf["secagg_neighbours"].iloc[0] == 23
    assert hp["secagg_threshold"].iloc[0] == 6 and hf["secagg_threshold"].iloc[0] == 12
    assert hp["bytes_down"].iloc[0] < hf["bytes_down"].iloc[0]
    assert torch.allclose(full.weights, plus.weights, atol=1e-4)  # the same mean, another graph
    m = hp.attrs["manifest"]["aggregation"]
    assert m["protocol"] == "secagg+" and m["neighbours"] == "log" and m["neighbours_k"] == 10
    mf = hf.attrs["manifest"]["aggregation"]
    assert {k: mf[k] for k in ("protocol", "version", "curve", "kdf", "mask_prg", "aead", "commitment", "seed_bits",
                               "frac", "bound", "threshold", "neighbours")} == {
        "protocol": "secagg", "version": 1, "curve": "X25519", "kdf": "HKDF-SHA256", "mask_prg": "ChaCha20",
        "aead": "ChaCha20-Poly1305", "commitment": "SHA-256", "seed_bits": 256, "frac": 16, "bound": 1.0,
        "threshold": 0.5, "neighbours": None}
    assert mf["ring_bits"] == hf["secagg_ring_bits"].iloc[0] == 23  # ceil(log2(2 * 24 * 2^16)) + 1


@pytest.mark.parametrize("kw,match", [
    ({"threshold": 1}, "t = 1 < 2"), ({"threshold": 0.0}, r"\(0, 1\]"), ({"threshold": "half"}, "int t"),
    ({"bound": -1.0}, "bound"), ({"frac": -2}, "frac"), ({"neighbours": 1}, "int >= 2"),
    ({"dropout": 1.0}, r"\[0, 1\)"), ({"dropout": {"later": 0.1}}, "stages"), ({"commitments": 1}, "bool")])
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        SecureAggregation(**kw)


def test_a_single_client_round_is_refused():
    with pytest.raises(ValueError, match="at least 2 clients"):
        SecureAggregation().over_wire(Wire(), _uploads(m=1))
    with pytest.raises(ValueError, match="SecAggPlus needs neighbours"):
        SecAggPlus(neighbours=None)


def test_the_protocols_client_and_server_seconds_are_reported(clients):
    import time
    u = _uploads(m=6, d=40)
    t = time.perf_counter()
    small = SecureAggregation(threshold=3).over_wire(Wire(), u)
    wall = time.perf_counter() - t
    c, s = small.report["secagg_client_seconds"], small.report["secagg_server_seconds"]
    assert c > 0 and s > 0 and c + s <= wall  # the parties' calls, inside the round's wall time
    big = SecureAggregation(threshold=3).over_wire(Wire(), _uploads(m=6, d=200_000))
    assert big.report["secagg_client_seconds"] > 5 * c  # masks expand with the vector's length
    history = _fl(clients, SecureAggregation()).fit(rounds=2)
    assert (history["secagg_client_seconds"] > 0).all() and (history["secagg_server_seconds"] > 0).all()
