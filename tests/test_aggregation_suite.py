"""The aggregation suite (toolkit.experiments_aggregation) at tiny sizes: what its probe hands the
attack for a plain, a masked and an encrypted transcript, the bytes and compute it attributes, its
budgeted skips, and the benchmark script end to end."""
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.func import functional_call, grad

from attacks import DLG
from defenses.dp_federated import DPFedAvg
from toolkit.aggregation_probe import ClockedWire, server_reading
from toolkit.experiments_aggregation import (SuiteConfig, _estimate, aggregation_suite, attack_leakage, plot_suite,
                                             probe_round)
from toolkit.federated import Aggregate, PlainSum, WireAggregator
from toolkit.messages import Transfer

ROOT = Path(__file__).resolve().parents[1]
BITS, FRAC = 24, 12
DLG_SHORT = attack_leakage(lambda model, shape, lr: DLG(model, input_shape=shape, client_lr=lr), max_steps=3)


class RingMasks(WireAggregator):
    """Toy masking: each client sends its fixed-point update plus a mask, the masks summing to 0 mod 2^BITS."""

    name = "toy_masks"

    def over_wire(self, wire, uploads):
        before = wire.total_bytes
        m, p = uploads.updates.shape
        w = uploads.weights / uploads.weights.sum()
        enc = torch.round(uploads.updates.double() * w[:, None] * 2 ** FRAC).long() % 2 ** BITS
        masks = torch.randint(0, 2 ** BITS, (m, p), generator=torch.Generator().manual_seed(uploads.round))
        masks[-1] = (-masks[:-1].sum(0)) % 2 ** BITS
        got = wire.send((enc + masks) % 2 ** BITS, sender=uploads.names, receiver="server", kind="masked_input")
        total = got.sum(0) % 2 ** BITS
        total = torch.where(total >= 2 ** (BITS - 1), total - 2 ** BITS, total).double() / 2 ** FRAC
        return Aggregate(total.to(uploads.updates.dtype), uploads.names, wire.total_bytes - before, 0)

    def manifest(self):
        return {"protocol": self.name, "inner": {"ring_bits": BITS, "frac": FRAC}}  # nested, as a wrapper's


class Sealed(WireAggregator):
    """Toy encryption: clients send sealed bytes (not one value per parameter) the key holder opens."""

    name = "toy_sealed"

    def over_wire(self, wire, uploads):
        before = wire.total_bytes
        raw = uploads.updates.contiguous().view(torch.uint8)  # (M, 4P)
        key = torch.randint(0, 256, raw.shape[1:], dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
        sealed = torch.cat([raw ^ key, torch.zeros(len(raw), 16, dtype=torch.uint8)], 1)  # + a 16-byte tag
        got = wire.send(sealed, sender=uploads.names, receiver="server", kind="ciphertext")
        opened = wire.send(got, sender="server", receiver="keyholder", kind="ciphertext")[:, :-16] ^ key
        updates = opened.contiguous().view(uploads.updates.dtype)
        w = uploads.weights.to(updates.dtype)
        total = wire.send(w @ updates / w.sum(), sender="keyholder", receiver="server", kind="sum")
        return Aggregate(total, uploads.names, wire.total_bytes - before, 0)


class Sleepy(WireAggregator):
    """PlainSum whose clients compute for ``client`` s before sending, whose server computes ``per_sample`` s
    per sample after."""

    def __init__(self, client=0.0, per_sample=0.0):
        self.client, self.per_sample = client, per_sample

    def over_wire(self, wire, uploads):
        time.sleep(self.client)
        result = PlainSum().over_wire(wire, uploads)
        time.sleep(self.per_sample * float(uploads.weights.sum()))
        return result


def smoke(**changes):
    return SuiteConfig(**{**vars(SuiteConfig.smoke()), **changes})


def test_the_probe_hands_the_attack_the_target_clients_single_sample_single_step_update():
    config = smoke()
    probe = probe_round(lambda c, n: PlainSum(), config, 6)
    (update, weights) = probe.observed
    assert (update.kind, update.sender, weights.kind, weights.receiver) == ("update", "client:0", "weights", "client:0")
    model = config.model(config.load())
    params = dict(model.named_parameters())
    loss = lambda p: torch.nn.functional.cross_entropy(functional_call(model, p, (probe.truth,)), probe.label)  # noqa: E731
    g = grad(loss)({k: v.detach() for k, v in params.items()})
    expected = torch.cat([-config.probe_lr * g[k].flatten() for k in params])
    torch.testing.assert_close(update.tensor, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weights.tensor, torch.cat([v.detach().flatten() for v in params.values()]))
    assert {t.sender for t in probe.server_view} == {"client:0"}  # only the target's messages were kept


def test_dlg_recovers_the_plain_update_and_not_the_masked_one_and_a_ciphertext_gives_it_nothing():
    called = []

    def leakage(probe):
        called.append(probe.scheme)
        return DLG_SHORT(probe)

    frame = aggregation_suite({"plain": lambda c, n: PlainSum(), "masked": lambda c, n: RingMasks(),
                               "sealed": lambda c, n: Sealed()}, smoke(clients=(4,)), leakage=leakage)
    rows = frame.set_index("scheme")
    assert rows.loc["plain", "psnr"] > 40 and rows.loc["plain", "label_accuracy"] == 1.0
    assert rows.loc["masked", "psnr"] < 15
    assert rows.loc["masked", "reading"] == "masked_input (int64 ring 2^24, decoded at 2^-12, 1,210 values)"
    assert math.isnan(rows.loc["sealed", "psnr"]) and called == ["plain", "masked"]
    assert rows.loc["sealed", "reading"] == "no update it can read (received ciphertext 4,856 B)"
    # the masked and sealed schemes still train to the plain accuracy (same seed; the ring rounds at 2^-12)
    assert abs(rows.loc["masked", "final_accuracy"] - rows.loc["plain", "final_accuracy"]) <= 0.02
    assert rows.loc["sealed", "final_accuracy"] == rows.loc["plain", "final_accuracy"]
    p = 1210
    assert rows["bytes_up"].tolist() == [4 * p, 8 * p, 4 * p + 16]  # per client and round, from the Wire
    assert rows["expansion"].tolist() == pytest.approx([1.0, 2.0, 1 + 16 / (4 * p)])
    assert (rows["bytes_down"] == 4 * p).all()  # the weights; the key holder's messages go to the server


def test_central_dp_reports_epsilon_and_its_server_still_reads_the_plain_update():
    dp = lambda c, n: DPFedAvg.for_config(c, n, clip=1.0, noise_multiplier=1.0,  # noqa: E731
                                          generator=torch.Generator().manual_seed(0), accountants=("rdp",))
    frame = aggregation_suite({"central DP": dp}, smoke(clients=(4,)))
    row = frame.iloc[0]
    history = frame.attrs["histories"]["central DP@4"]
    assert row["epsilon_rdp"] == history["epsilon_rdp"].iloc[-1] > 0 and row["delta"] == 1e-5
    assert row["reading"] == "update (float32, 1,210 values)" and "psnr" not in frame  # no attack was asked for
    assert frame.attrs["manifests"]["central DP@4"] == {"protocol": "dp_fedavg"}


def test_compute_is_charged_to_the_party_that_sends_next_and_rounds_to_target_follow_the_history():
    frame = aggregation_suite({"sleepy": lambda c, n: Sleepy(client=0.2)}, smoke(clients=(4,), target_accuracy=0.5))
    row = frame.iloc[0]
    assert row["client_seconds"] >= 0.2 / 4 and row["server_seconds"] < 0.1 and row["messages"] == 1
    history = frame.attrs["histories"]["sleepy@4"]
    first = int((history["accuracy"] >= 0.5).to_numpy().argmax())
    assert row["rounds_to_target"] == first + 1
    config = smoke()
    per_round = (history["client_seconds"] / 4 + history["server_seconds"] + history["bytes_up"] / 4 * 8 / 10e6
                 + history["bytes_down"] / 4 * 8 / 50e6 + config.latency * 2)
    assert row["time_to_target"] == pytest.approx(float(per_round.cumsum().iloc[first]))
    assert row["time_to_target"] >= config.latency * 2 * (first + 1)


def test_clocked_wire_keeps_only_the_kept_partys_rows_and_counts_every_byte():
    wire = ClockedWire(("client:0", "client:1"), keep="client:1")
    wire.broadcast(torch.zeros(3), sender="server", receivers=("client:0", "client:1"), kind="weights")
    wire.send(torch.arange(6.0).view(2, 3), sender=("client:0", "client:1"), receiver="server", kind="update")
    wire.send(torch.ones(2), sender="client:0", receiver="server", kind="keys")
    assert [(t.sender, t.receiver, t.kind, t.tensor.tolist()) for t in wire.observed()] == [
        ("server", "client:1", "weights", [0.0, 0.0, 0.0]), ("client:1", "server", "update", [3.0, 4.0, 5.0])]
    assert wire.total_bytes == 2 * 12 + 24 + 8


def test_a_scheme_too_slow_for_the_budget_is_probed_but_not_trained_then_skipped_at_the_next_n():
    frame = aggregation_suite({"slow": lambda c, n: Sleepy(client=0.4)}, smoke(clients=(3, 6), rounds=3,
                                                                            budget_seconds=1.0))
    untrained, skipped = frame.iloc[0], frame.iloc[1]
    assert untrained["status"] == "untrained" and "3 rounds would take about" in untrained["reason"]
    assert untrained["measured"] == "probe round" and math.isnan(untrained["final_accuracy"])
    assert untrained["reading"] == "update (float32, 1,210 values)" and untrained["bytes_up"] == 4 * 1210
    assert skipped["status"] == "skipped" and "scaled as n^2.00), over the budget of 1 s" in skipped["reason"]
    assert math.isnan(skipped["bytes_up"]) and "slow@6" not in frame.attrs["histories"]


def test_training_that_outgrows_its_probe_stops_at_the_budget():
    # the server's time grows with the samples aggregated: 3 in the probe, the whole training set in training
    frame = aggregation_suite({"grows": lambda c, n: Sleepy(per_sample=0.5 / 1437)}, smoke(clients=(3,), rounds=4,
                                                                                         budget_seconds=1.0))
    row = frame.iloc[0]
    assert row["status"] == "partial" and row["rounds"] < 4 and f"stopped after {row['rounds']} of 4" in row["reason"]


def test_the_extrapolation_fits_the_exponent_on_two_sizes_within_one_and_two():
    assert _estimate([], 10) == (0.0, 0.0)
    assert _estimate([(10, 1.0)], 100) == (100.0, 2.0)
    assert _estimate([(10, 1.0), (100, 10.0)], 1000) == pytest.approx((100.0, 1.0))
    assert _estimate([(10, 1.0), (100, 1.0)], 1000) == pytest.approx((10.0, 1.0))  # clamped up to 1
    assert _estimate([(10, 1.0), (100, 1000.0)], 1000) == pytest.approx((1e5, 2.0))  # clamped down to 2


def test_server_reading_takes_the_last_fitting_tensor_and_names_what_it_could_not_read():
    send = lambda kind, x: Transfer(1, "client:0", "server", kind, x)  # noqa: E731
    got, what = server_reading([send("update", torch.ones(3)), send("keys", torch.ones(2))], 3, {})
    assert got.tolist() == [1.0, 1.0, 1.0] and what == "update (float32, 3 values)"
    got, what = server_reading([send("masked", torch.tensor([2 ** 16, 2 ** 17 - 1]))], 2, {})  # no manifest: frac 16
    assert got.tolist() == [-1.0, -2.0 ** -16] and "ring 2^17, decoded at 2^-16" in what
    assert server_reading([send("ct", torch.zeros(5, dtype=torch.uint8))], 3, {}) == (
        None, "no update it can read (received ct 5 B)")


def test_bad_input_is_refused_naming_the_problem():
    with pytest.raises(ValueError, match="non-empty mapping"):
        aggregation_suite({}, smoke())
    with pytest.raises(ValueError, match="must return a WireAggregator or an Aggregator"):
        aggregation_suite({"bad": lambda c, n: 3}, smoke())
    with pytest.raises(ValueError, match="rounds must be a positive int"):
        smoke(rounds=0)
    with pytest.raises(ValueError, match="7 clients need at least 7 training samples"):
        probe_round(lambda c, n: PlainSum(), smoke(), 7, data=smoke().load().subset(range(6)))


def test_the_plot_draws_every_measured_row_and_puts_unreadable_ones_on_the_floor():
    import matplotlib
    matplotlib.use("Agg")
    frame = aggregation_suite({"plain": lambda c, n: PlainSum(), "sealed": lambda c, n: Sealed()},
                              smoke(clients=(3,)), leakage=DLG_SHORT)
    fig, ax = plot_suite(frame)
    assert ax.get_xscale() == "log" and len(ax.texts) == 3  # two scheme labels and the floor's
    floor = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(floor) == 1 and floor[0].get_ydata()[0] == pytest.approx(frame["psnr"].min() - 3)
    with pytest.raises(ValueError, match="no column 'watts'"):
        plot_suite(frame, x="watts")
    rows = pd.DataFrame(frame.to_dict("records"))  # the rows, without the histories in attrs
    twins = pd.concat([rows, rows.assign(scheme="twin")], ignore_index=True)  # the same spots twice
    _, ax2 = plot_suite(twins)
    labels = sorted(t.get_text() for t in ax2.texts)
    assert len(ax2.texts) == 3 and "plain, twin" in labels and "sealed, twin" in labels


@pytest.mark.skipif(not (ROOT / "benchmarks" / "aggregation_suite.py").exists(), reason="benchmark not written yet")
def test_the_benchmark_prints_its_table_and_writes_csv(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "aggregation_suite.py"), "--threads", "1",
                           "--quick", "--out", str(tmp_path / "suite.csv")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "Bonawitz" in proc.stdout and (tmp_path / "suite.csv").stat().st_size > 0
    table = pd.read_csv(tmp_path / "suite.csv")
    schemes = ["plain", "central_dp", "distributed_dp", "local_dp", "secagg", "secagg_plus", "ckks", "ckks_noise"]
    assert table[["scheme", "clients"]].values.tolist() == [[s, n] for s in schemes for n in (4, 8)]
    assert {"psnr", "epsilon_rdp", "final_accuracy", "bytes_up", "client_seconds", "server_seconds"} <= set(table)
    assert (table.loc[table["scheme"].str.contains("dp"), "epsilon_rdp"] > 0).all()
    assert table.loc[table["scheme"].isin(["plain", "secagg", "ckks"]), "epsilon_rdp"].isna().all()
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[-8:] if line.strip()}
    assert lines["plain"][4] == "1.00x" and float(lines["plain"][5]) == 0  # float32 in the clear, no peers
    assert float(lines["secagg"][5]) > float(lines["secagg_plus"][5]) > 0  # bytes per peer: every pair vs k
    assert float(lines["secagg"][3].rstrip("x")) > 1 and lines["Bonawitz"][1] == "1.73x"
    assert float(lines["secagg"][6]) < 1e-9  # SecAgg's bytes: the masked input at ring_bits(n) plus a + b n, exactly
    both = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "aggregation_suite.py"), "--quick",
                           "--expansion-only", "--no-expansion"], capture_output=True, text=True, timeout=120, env=env,
                          cwd=ROOT)
    assert both.returncode != 0 and "exclude each other" in both.stderr


def test_the_real_schemes_through_the_suite_secure_distributed_dp_and_ckks():
    from defenses import DPAggregation, HomomorphicAggregation, SecureAggregation
    schemes = {"plain": lambda c, n: PlainSum(), "secagg": lambda c, n: SecureAggregation(bound=4.0),
               "distributed_dp": lambda c, n: DPAggregation.for_config(
                   c, n, inner=SecureAggregation(bound=4.0), mode="distributed", clip=1.0, noise_multiplier=1.0,
                   accountants=("rdp",)),
               "ckks": lambda c, n: HomomorphicAggregation()}
    frame = aggregation_suite(schemes, smoke(clients=(4,)), leakage=DLG_SHORT)
    rows = frame.set_index("scheme")
    assert (rows["status"] == "ok").all() and rows.loc["plain", "psnr"] > 40
    for name in ("secagg", "distributed_dp", "ckks"):  # packed ring elements and ciphertexts: nothing to invert
        assert rows.loc[name, "reading"].startswith("no update it can read") and math.isnan(rows.loc[name, "psnr"])
    assert "masked-input" in rows.loc["secagg", "reading"] and "masked-input" not in rows.loc["ckks", "reading"]
    assert abs(rows.loc["secagg", "final_accuracy"] - rows.loc["plain", "final_accuracy"]) <= 0.01
    assert rows.loc["ckks", "bytes_up"] > 10 * rows.loc["plain", "bytes_up"]  # ciphertexts against float32
    assert rows.loc["secagg", "bytes_up"] < rows.loc["plain", "bytes_up"]  # packed ring elements
    assert (rows.loc[["secagg", "ckks"], "server_seconds"] > 0).all()
    assert (rows.loc[["secagg", "ckks"], "client_seconds"] > 0).all()
    history = frame.attrs["histories"]["secagg@4"]
    assert (history["secagg_client_seconds"] > 0).all() and (history["secagg_server_seconds"] > 0).all()
    # the suite's per-client compute holds local training and the protocol's client side
    assert (history["client_seconds"] >= history["secagg_client_seconds"]).all()
    dp = frame.attrs["histories"]["distributed_dp@4"]
    assert rows.loc["distributed_dp", "epsilon_rdp"] == dp["epsilon_rdp"].iloc[-1] > dp["epsilon_rdp"].iloc[0] > 0
    manifests = frame.attrs["manifests"]
    assert manifests["secagg@4"]["protocol"] == "secagg" and manifests["secagg@4"]["ring_bits"] > 0
    assert manifests["distributed_dp@4"]["dp"]["mode"] == "distributed"
    assert rows.loc["distributed_dp", "protocol"] == "secagg" and rows.loc["ckks", "protocol"] != "plain"
