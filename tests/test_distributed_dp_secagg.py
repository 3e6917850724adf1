"""Distributed DP through secure aggregation (DPAggregation with SecureAggregation as its inner, Kairouz
et al. 2021 over Bonawitz et al. 2017): in FedAvg epsilon is reported every round, the server's transcript
holds only masked vectors (never an update, noised or not), and the released sum is the noised
plaintext sum within the fixed-point tolerance."""
import math

import pytest
import torch

from defenses.aggregation_dp import DPAggregation
from defenses.secagg.wireformat import to_bytes, unpack_ring
from defenses.secure_aggregation import SecureAggregation
from toolkit import data, models
from toolkit.accounting import PrivacyAccountant
from toolkit.federated import FedConfig, FederatedAveraging, Uploads
from toolkit.wire import Wire

Z, C, BOUND, FRAC = 1.0, 1.0, 4.0, 16
SERVER_KINDS = {"secagg-keys", "secagg-shares", "secagg-seed-hash", "masked-input", "secagg-commit", "unmask-shares",
                "secagg-opening"}


def _decode(y, bits, frac=FRAC):
    """A ring vector read as the fixed-point numbers it would be if it were an honest encoding."""
    signed = torch.where(y >= 1 << (bits - 1), y - (1 << bits), y)
    return signed.double() / 2 ** frac


def test_distributed_dp_through_secure_aggregation_in_fedavg():
    config = FedConfig(fraction=0.5, seed=3, lr=0.2)
    clients = data.partition(data.load("digits"), 12, seed=0)
    agg = DPAggregation.for_config(config, 12, inner=SecureAggregation(threshold=3, bound=BOUND, frac=FRAC),
                                   mode="distributed", clip=C, noise_multiplier=Z, accountants=("rdp",))
    wire = Wire(record=True)
    torch.manual_seed(0)
    fl = FederatedAveraging(models.mlp([64, 16, 10]), clients, config=config, aggregator=agg, wire=wire)
    history = fl.fit(rounds=3)

    # epsilon every round: the subsampled Gaussian at q = 6 / 12, one step per round
    for r in range(1, 4):
        fresh = PrivacyAccountant(delta=1e-5, accountants=("rdp",))
        fresh.step(noise_multiplier=Z, sample_rate=0.5, steps=r)
        assert history["epsilon_rdp"].iloc[r - 1] == pytest.approx(fresh.report()["epsilon_rdp"], rel=1e-9)
    assert history["epsilon_rdp"].is_monotonic_increasing and history["epsilon_rdp"].iloc[0] > 0
    assert (history["dp_mode"] == "distributed").all() and (history["dp_included"] == 6).all()
    assert (history["secagg_clipped"] == 0).all()  # the noised, clipped updates fit the fixed-point bound
    assert history.attrs["manifest"]["aggregation"]["protocol"] == "secagg"
    assert history.attrs["manifest"]["aggregation"]["dp"]["mode"] == "distributed"

    # the server's transcript: protocol messages and masked vectors only
    seen = wire.observed(by="server")
    assert {t.kind for t in seen} == SERVER_KINDS  # no "update" upload
    masked = [t for t in seen if t.kind == "masked-input"]
    assert len(masked) == 3 * 6  # one per client and round
    bits = int(history["secagg_ring_bits"].iloc[0])
    d = len(fl.weights) + 1  # the update and the weight coordinate
    for t in masked:
        y = unpack_ring(t.tensor, d, bits)
        # an honest encoding lies within [-bound, bound]; a masked vector is uniform over the ring
        assert float((_decode(y, bits).abs() <= BOUND).double().mean()) < 0.5


def _uploads(k, p, seed):
    g = torch.Generator().manual_seed(seed)
    updates = torch.randn(k, p, generator=torch.Generator().manual_seed(seed + 1)) * 0.05
    names = tuple(f"client:{i}" for i in range(k))
    return Uploads(updates, names, torch.full((k,), 30.0, dtype=torch.float64), torch.zeros(k, dtype=torch.float64),
                   1, g)


def test_the_release_is_the_noised_plaintext_sum_within_the_fixed_point_tolerance():
    m, p = 8, 3000
    up = _uploads(m, p, seed=5)
    replay = torch.Generator()
    replay.set_state(up.generator.get_state())
    agg = DPAggregation(SecureAggregation(threshold=4, bound=BOUND, frac=FRAC), mode="distributed", clip=C,
                        noise_multiplier=Z, clients_per_round=m, total_clients=2 * m, accountants=("rdp",))
    wire = Wire(record=True)
    out = agg.over_wire(wire, up)

    # what each client put into secure aggregation: its clipped update plus its share of the noise
    norms = torch.linalg.vector_norm(up.updates.double(), dim=1)
    clipped = (up.updates.double() * (C / norms).clamp(max=1.0)[:, None]).to(up.updates.dtype)
    std = Z * C / math.sqrt(m)
    noised = clipped + std * torch.randn(clipped.shape, generator=replay, dtype=clipped.dtype)
    assert std == agg.client_std()
    want = noised.double().sum(0) / m
    tol = 2.0 ** -(FRAC + 1) * 1.01  # one rounding per client, summed over m clients, divided by m
    assert (out.update.double() - want).abs().max() <= tol
    assert (out.update.double() - clipped.double().sum(0) / m).abs().max() > 100 * tol  # the noise is there
    assert out.included == up.names and agg.report()["epsilon_rdp"] > 0

    # the server never saw a noised update: the masked vectors are uncorrelated with them
    bits = out.report["secagg_ring_bits"]
    blob = b"".join(to_bytes(t.tensor.flatten()) for t in wire.observed(by="server"))
    for t in wire.observed(by="server", kind="masked-input"):
        i = up.names.index(t.sender)
        y = _decode(unpack_ring(t.tensor, p + 1, bits), bits)[:p]
        corr = torch.corrcoef(torch.stack([y, noised[i].double()]))[0, 1]
        assert abs(float(corr)) < 0.1
        assert noised[i, :8].numpy().tobytes() not in blob
