"""DPAggregation around any wire aggregation (plain, homomorphic, one that drops clients): each
mode's noise has its calibrated std and is added on the clients' side before the inner
aggregation, central DP releases and accounts what DPFedAvg does, noise off is the clipped mean,
local DP spends more than central, dropouts are accounted with the realized multiplier, every draw
comes from the protocol's generator, and a failed round spends nothing."""
import math

import pytest
import torch

from defenses import DPFedAvg
from defenses.aggregation_dp import DPAggregation
from defenses.homomorphic_aggregation import HomomorphicAggregation
from toolkit import data, models
from toolkit.accounting import PrivacyAccountant, epsilon
from toolkit.federated import Aggregate, FedConfig, FederatedAveraging, PlainSum, Uploads, WireAggregator
from toolkit.wire import Wire

M, N, P = 10, 20, 10_000
Z, C = 2.0, 0.5
INNERS = {"plain": PlainSum, "ckks": HomomorphicAggregation}


class DropLast(WireAggregator):
    """An inner aggregation that leaves out the last ``drop`` clients (as secure aggregation does
    with dropouts) and records what it was handed."""

    name = "drop-last"

    def __init__(self, drop):
        self.drop, self.seen = drop, []

    def over_wire(self, wire, uploads):
        self.seen.append(uploads)
        kept = uploads.subset(torch.arange(len(uploads.names) - self.drop))
        return PlainSum().over_wire(wire, kept)


def dp(inner=None, mode="central", z=Z, clip=C, m=M, n=N, **kw):
    return DPAggregation(PlainSum() if inner is None else inner, mode=mode, clip=clip, noise_multiplier=z,
                         clients_per_round=m, total_clients=n, **kw)


def uploads(k=M, p=P, *, seed=0, scale=0.0):
    g = torch.Generator().manual_seed(seed)
    u = scale * torch.randn(k, p, generator=torch.Generator().manual_seed(seed + 100))
    return Uploads(u, tuple(f"c{i}" for i in range(k)), torch.arange(1, k + 1, dtype=torch.float64),
                   torch.zeros(k, dtype=torch.float64), 1, g)


EXPECTED_STD = {  # of each coordinate of the release, with all M clients included
    "central": Z * C / M, "distributed": Z * C / M, "local": Z * C * math.sqrt(M) / M}
CLIENT_STD = {"central": 0.0, "distributed": Z * C / math.sqrt(M), "local": Z * C}


@pytest.mark.parametrize("inner", sorted(INNERS))
@pytest.mark.parametrize("mode", sorted(EXPECTED_STD))
def test_each_modes_noise_has_its_calibrated_std(inner, mode):
    agg = dp(INNERS[inner](), mode)
    out = agg.over_wire(Wire(), uploads())  # zero updates: the release is the noise alone
    assert out.included == tuple(f"c{i}" for i in range(M))
    assert abs(out.update.double().std().item() / EXPECTED_STD[mode] - 1) < 0.05
    assert abs(out.update.double().mean().item()) < 4 * EXPECTED_STD[mode] / math.sqrt(P)
    assert agg.client_std() == pytest.approx(CLIENT_STD[mode])
    assert out.report["dp_mode"] == mode and out.report["dp_noise_multiplier"] == Z


@pytest.mark.parametrize("mode", sorted(CLIENT_STD))
def test_the_clients_noise_is_added_before_the_inner_aggregation(mode):
    wire, up = Wire(), uploads(scale=1e-4)  # small updates: never clipped
    dp(mode=mode).over_wire(wire, up)
    sent = torch.stack([t.tensor for t in wire.observed(by="server", kind="update")])  # what the server got
    residual = sent - up.updates
    if mode == "central":
        torch.testing.assert_close(sent, up.updates, atol=1e-7, rtol=0)  # noise is the server's to add
    else:
        assert abs(residual.std().item() / CLIENT_STD[mode] - 1) < 0.05


def test_the_inner_is_handed_unit_weights_and_the_released_sum_is_its_mean_times_the_included():
    inner = DropLast(drop=0)
    up = uploads(4, 50, scale=1.0)
    out = dp(inner, z=0.0, m=4, clip=100.0).over_wire(Wire(), up)
    assert torch.equal(inner.seen[0].weights, torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(out.update, up.updates.sum(0) / 4, atol=1e-6, rtol=0)


@pytest.mark.parametrize("inner", sorted(INNERS))
def test_distributed_dropouts_are_accounted_with_the_realized_multiplier(inner):
    agg = dp(DropLast(drop=4) if inner == "plain" else INNERS[inner](), "distributed", accountants=("rdp",))
    k = 6 if inner == "plain" else 7
    up = uploads(M if inner == "plain" else k)  # the homomorphic inner includes all it is handed
    out = agg.over_wire(Wire(), up)
    assert len(out.included) == k
    realized = Z * math.sqrt(k / M)
    assert out.report["dp_noise_multiplier"] == pytest.approx(realized)
    assert abs(out.update.double().std().item() / (realized * C / M) - 1) < 0.05  # the fixed denominator M
    expected = epsilon(noise_multiplier=realized, sample_rate=M / N, steps=1, delta=1e-5)
    assert agg.report()["epsilon_rdp"] == pytest.approx(expected, rel=1e-9)
    assert agg.report()["epsilon_rdp"] > epsilon(noise_multiplier=Z, sample_rate=M / N, steps=1, delta=1e-5)


@pytest.mark.parametrize("inner", sorted(INNERS))
@pytest.mark.parametrize("mode", sorted(EXPECTED_STD))
def test_noise_off_releases_the_clipped_mean(inner, mode):
    up = uploads(M, 2000, scale=0.02)  # norms around 0.9: some above the clip of 0.9, some below
    agg = dp(INNERS[inner](), mode, z=0.0, clip=0.9)
    out = agg.over_wire(Wire(), up)
    norms = up.updates.norm(dim=1, keepdim=True)
    clipped = up.updates * (0.9 / norms).clamp(max=1.0)
    torch.testing.assert_close(out.update.double(), clipped.double().sum(0) / M, atol=1e-6, rtol=0)
    assert 0 < agg.report()["dp_clipped"] < 1
    assert agg.report()["epsilon_rdp"] == math.inf and agg.report()["epsilon_prv"] == math.inf


def test_central_releases_and_accounts_what_dpfedavg_does():
    up = uploads(M, 500, scale=0.1)
    ours = dp(mode="central").over_wire(Wire(), up)
    theirs = DPFedAvg(clip=C, noise_multiplier=Z, clients_per_round=M, total_clients=N,
                      generator=torch.Generator().manual_seed(0))(up.updates, up.weights)
    torch.testing.assert_close(ours.update, theirs, atol=1e-6, rtol=0)  # the same generator state, the same draw

    digits = data.load("digits")
    config = FedConfig(fraction=0.5, seed=2)

    def run(aggregator):
        torch.manual_seed(0)
        fl = FederatedAveraging(models.mlp([64, 16, 10]), data.partition(digits, 10), config=config,
                                aggregator=aggregator)
        return fl.fit(rounds=3)

    a = run(DPAggregation.for_config(config, 10, inner=PlainSum(), mode="central", clip=1.0, noise_multiplier=1.1))
    b = run(DPFedAvg.for_config(config, 10, clip=1.0, noise_multiplier=1.1, generator=torch.Generator()))
    for column in ("epsilon_rdp", "epsilon_prv", "delta"):
        assert a[column].tolist() == pytest.approx(b[column].tolist(), rel=1e-12)
    assert a["epsilon_rdp"].is_monotonic_increasing and (a["dp_mode"] == "central").all()


def test_local_spends_at_least_what_central_spends_and_distributed_equals_central():
    reports = {}
    for mode in ("central", "distributed", "local"):
        agg = dp(mode=mode, z=1.0)
        rows = []
        for r in range(3):
            agg.over_wire(Wire(), uploads(M, 10, seed=r))
            rows.append(agg.report())
        reports[mode] = rows
    for central, distributed, local in zip(reports["central"], reports["distributed"], reports["local"]):
        for key in ("epsilon_rdp", "epsilon_prv"):
            assert local[key] >= central[key] > 0
            assert distributed[key] == pytest.approx(central[key], rel=1e-12)
    # local: the most often included client's budget at sample rate 1
    assert reports["local"][-1]["epsilon_rdp"] == pytest.approx(
        epsilon(noise_multiplier=1.0, sample_rate=1.0, steps=3, delta=1e-5), rel=1e-9)


def test_local_accounting_follows_the_most_often_included_client():
    agg = dp(mode="local", z=1.0, m=3, n=6, accountants=("rdp",))
    for names in (("a", "b"), ("c", "d"), ("a", "e")):
        up = Uploads(torch.zeros(2, 4), names, torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                     1, torch.Generator())
        agg.over_wire(Wire(), up)
    assert agg.participation == {"a": 2, "b": 1, "c": 1, "d": 1, "e": 1}
    assert agg.report()["epsilon_rdp"] == pytest.approx(
        epsilon(noise_multiplier=1.0, sample_rate=1.0, steps=2, delta=1e-5), rel=1e-9)


@pytest.mark.parametrize("inner", sorted(INNERS))
def test_every_draw_comes_from_the_protocols_generator(inner):
    digits = data.load("digits")

    def run(seed, global_seed):
        torch.manual_seed(0)
        model = models.mlp([64, 16, 10])
        config = FedConfig(fraction=0.5, seed=seed)
        agg = DPAggregation.for_config(config, 6, inner=INNERS[inner](), mode="distributed", clip=1.0,
                                       noise_multiplier=1.0, accountants=("rdp",))
        fl = FederatedAveraging(model, data.partition(digits, 6), config=config, aggregator=agg)
        torch.manual_seed(global_seed)  # the global generator must not matter
        fl.fit(rounds=2)
        return fl.weights

    first, again, other = run(1, 10), run(1, 20), run(2, 10)
    tolerance = 0.0 if inner == "plain" else 1e-6  # CKKS's own error, its randomness being the OS's
    assert (first - again).abs().max() <= tolerance
    assert (first - other).abs().max() > 1e-3


def test_a_failed_inner_round_releases_and_spends_nothing():
    class Tamper:
        def __call__(self, t, *, kind):
            return t[:-3] if kind == "he-ciphertext" else t

    agg = dp(HomomorphicAggregation(), "distributed", m=3, n=6)
    before = agg.state_dict()
    with pytest.raises(ValueError, match="clients 'c0'"):
        agg.over_wire(Wire([Tamper()]), uploads(3, 20))
    assert agg.state_dict() == before and agg.rounds == 0 and not agg.accountant.history


def test_state_round_trips_and_a_resumed_run_continues_exactly(tmp_path):
    digits = data.load("digits")

    def build():
        torch.manual_seed(0)
        config = FedConfig(fraction=0.5, seed=4)
        agg = DPAggregation.for_config(config, 6, inner=PlainSum(), mode="local", clip=1.0, noise_multiplier=0.8,
                                       accountants=("rdp",))
        return FederatedAveraging(models.mlp([64, 16, 10]), data.partition(digits, 6), config=config, aggregator=agg)

    straight = build()
    straight.fit(rounds=3)
    first = build()
    first.fit(rounds=2)
    first.save(tmp_path / "run.pt")
    resumed = build()
    resumed.load(tmp_path / "run.pt")
    resumed.fit(rounds=1)
    assert torch.equal(resumed.weights, straight.weights)
    assert resumed.history["epsilon_rdp"].tolist() == straight.history["epsilon_rdp"].tolist()
    assert resumed.aggregator.participation == straight.aggregator.participation
    agg = resumed.aggregator
    before = agg.state_dict()
    with pytest.raises(ValueError, match="malformed DPAggregation state"):
        agg.load_state_dict({**before, "history": [[1.0, 2.0, 1]]})  # a sample rate above 1
    with pytest.raises(ValueError, match="unexpected"):
        agg.load_state_dict({**before, "inner": {"x": 1}})
    assert agg.state_dict() == before


def test_manifest_is_the_inners_plus_the_dp_parameters():
    record = dp(HomomorphicAggregation(), "distributed", delta=1e-6, accountants=("prv",)).manifest()
    assert record["scheme"] == "CKKS" and record["protocol"] == "ckks"
    assert record["dp"] == {
        "mechanism": "gaussian", "mode": "distributed", "clip": C, "noise_multiplier": Z,
        "client_noise_std": Z * C / math.sqrt(M), "delta": 1e-6, "accountants": ["prv"], "sample_rate": M / N,
        "accounted_sample_rate": M / N, "clients_per_round": M, "total_clients": N,
        "dropouts": "accounted with the realized multiplier"}
    assert dp(mode="local").manifest()["dp"]["accounted_sample_rate"] == 1.0
    assert dp().manifest()["protocol"] == "plain"


def test_for_config_and_attach_check_the_cohort():
    config = FedConfig(fraction=0.3)
    agg = DPAggregation.for_config(config, 10, inner=PlainSum(), mode="central", clip=1.0, noise_multiplier=1.0)
    assert (agg.clients_per_round, agg.total_clients, agg.sample_rate) == (3, 10, 0.3)
    digits = data.load("digits")
    with pytest.raises(ValueError, match="built for 3 of 10 clients per round, but this run samples 2 of 8"):
        FederatedAveraging(models.mlp([64, 16, 10]), data.partition(digits, 8), config=config, aggregator=agg)


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "global"}, "mode must be one of"),
    ({"inner": DPFedAvg(clip=1.0, noise_multiplier=1.0, clients_per_round=1, total_clients=2,
                        generator=torch.Generator())}, "inner must be a WireAggregator"),
    ({"clip": 0.0}, "clip must be a positive number"),
    ({"z": -1.0}, "noise_multiplier must be a non-negative number"),
    ({"m": 30}, "exceeds total_clients"),
    ({"delta": 2.0}, "delta"),
    ({"accountants": ("moments",)}, "unknown accountant"),
])
def test_bad_arguments_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dp(**kwargs)


def test_more_uploads_than_clients_per_round_are_refused():
    with pytest.raises(ValueError, match="received 4 uploads but was built for 3"):
        dp(m=3).over_wire(Wire(), uploads(4, 5))


def test_no_release_without_included_clients_spends_nothing():
    agg = dp(DropLast(drop=2), "central", m=2, n=4)
    out = agg.over_wire(Wire(), uploads(2, 5))
    assert isinstance(out, Aggregate) and out.included == () and not out.update.any()
    assert agg.rounds == 0 and not agg.accountant.history and agg.report()["epsilon_rdp"] == 0.0


def test_accountant_report_matches_a_fresh_accountant():
    agg = dp(mode="central", accountants=("rdp", "prv"))
    for r in range(2):
        agg.over_wire(Wire(), uploads(M, 10, seed=r))
    fresh = PrivacyAccountant(delta=1e-5)
    fresh.step(noise_multiplier=Z, sample_rate=M / N, steps=2)
    assert {k: agg.report()[k] for k in ("epsilon_rdp", "epsilon_prv", "delta")} == pytest.approx(fresh.report())
