"""The paper-figure presets: the formulas, the bytes the Wire counts against them, the crossover,
the FLOPs, the ring comparison, and the `make figures` script with its index page."""
import math

import matplotlib
import pandas as pd
import pytest
import torch
from torch import nn

matplotlib.use("Agg")

from toolkit.figures import FIGURES, RingLoan, SinghCommunication, SplitHealth, crossover  # noqa: E402
from toolkit.figures.__main__ import generate, main  # noqa: E402
from toolkit.figures.architectures import resnet50, vgg16  # noqa: E402
from toolkit.figures.communication import (crossover_clients, crossover_dataset_size, federated_values,  # noqa: E402
                                           split_values)
from toolkit.figures.health import PUBLISHED, client_flops, training_flops  # noqa: E402


@pytest.fixture(scope="module")
def singh():
    preset = SinghCommunication.smoke()
    return preset, preset.run()


# -- Singh et al. 2019: formulas and the Wire ---------------------------------------------------
def test_the_formulas_are_table_1s_and_the_crossovers_solve_them():
    p, k, q, n, eta = 12_000, 8, 64, 50_000, 0.25
    assert split_values(p, k, q, n, eta) == (2 * 1500 * 64 + 12_500, (2 * 1500 * 64 + 12_500) * 8)
    assert federated_values(k, n) == (100_000, 800_000)
    p_star = crossover_dataset_size(k, q, n, eta)
    assert split_values(p_star, k, q, n, eta)[0] == pytest.approx(federated_values(k, n)[0])
    k_star = crossover_clients(p, q, n, eta)
    assert split_values(p, k_star, q, n, eta)[0] == pytest.approx(2 * n)
    assert split_values(p, k_star * 2, q, n, eta)[0] < 2 * n < split_values(p, k_star / 2, q, n, eta)[0]


def test_crossover_interpolates_where_the_curves_cross_and_is_nan_when_they_do_not():
    assert crossover([1, 2], [0, 2], [1, 1], log=False) == pytest.approx(1.5)
    assert crossover([1, 4], [1, 4], [2, 2]) == pytest.approx(2.0)  # log-log: y = x meets y = 2 at x = 2
    assert crossover([1, 2, 3], [5, 3, 1], [2, 2, 2], log=False) == pytest.approx(2.5)
    assert math.isnan(crossover([1, 2, 3], [1, 2, 3], [5, 6, 7]))
    with pytest.raises(ValueError, match="strictly increasing"):
        crossover([2, 1], [1, 2], [2, 1])
    with pytest.raises(ValueError, match="positive"):
        crossover([1, 2], [0, 1], [1, 1])


def test_fedavg_moves_exactly_2n_per_client_and_the_relay_exactly_the_split_formula(singh):
    preset, frame = singh
    n, q, eta = frame.attrs["N"], frame.attrs["q"], frame.attrs["eta"]
    assert (n, q) == (64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10, 32)
    measured = frame[frame.source == "measured"]
    fed = measured[measured.method == "federated"]
    assert (fed[fed.sweep != "parameters"].bytes_per_client == 2 * n * 4).all()
    assert (fed.bytes_update == fed.bytes_weights).all()
    split = measured[measured.method == "split"]
    assert len(split) == len(preset.clients) + len(preset.dataset_sizes) + len(preset.server_widths)
    for _, row in split.iterrows():
        per, total = split_values(row.dataset_size, row.clients, q, row.parameters, row.eta)
        assert row.bytes == pytest.approx(total * 4, abs=0.5)  # exact: activations, gradients, K hand-offs
        assert row.bytes_per_client == pytest.approx(per * 4, abs=0.5)
        assert row.bytes_activations == row.bytes_gradients == row.dataset_size * q * 4
        assert row.bytes_labels == row.dataset_size * 8  # int64 labels: not in the paper's count
    assert (fed.bytes_per_client == 2 * fed.parameters * 4).all()
    assert sorted(fed[fed.sweep == "parameters"].parameters) == [
        preset.shape(h)["N"] for h in preset.server_widths]  # the server's layers grow ...
    assert (split.eta * split.parameters).round().nunique() == 1  # ... and the client's part stays
    formula = frame[(frame.source == "formula") & (frame.method == "federated")]
    assert (formula[formula.sweep != "parameters"].bytes_per_client == 2 * n * 4).all()
    assert (formula.bytes_per_client == 2 * formula.parameters * 4).all()


def test_the_default_model_has_the_sizes_its_comments_state_and_the_first_epoch_one_hand_off_less():
    shape = SinghCommunication().shape()
    assert (shape["N"], shape["q"]) == (269_322, 256) and shape["eta"] == pytest.approx(0.746, abs=1e-3)
    from toolkit.parties import flat_state
    from toolkit.split import Relay, SplitConfig

    preset = SinghCommunication.smoke()
    client, server = preset.parts()
    relay = Relay(client, server, preset._data(200, 4), config=SplitConfig(batch_size=32, record=False))
    relay.fit(1)
    weights = relay.wire.ledger().groupby("kind")["bytes"].sum()["weights"]
    assert weights == 3 * flat_state(client).numel() * 4  # K - 1 hand-offs; the preset measures the second epoch


def test_the_crossover_is_found_where_the_measured_curves_cross(singh):
    preset, frame = singh
    cross = frame.attrs["crossover"]
    assert cross["clients_formula"] == pytest.approx(crossover_clients(600, 32, frame.attrs["N"], frame.attrs["eta"]))
    n_star = 600 / 4 * 32 + frame.attrs["N_client"] / 2  # 2(p/K)q + eta N = 2N
    assert cross["parameters_formula"] == pytest.approx(n_star)
    widths = [preset.shape(h)["N"] for h in preset.server_widths]
    for sweep, values in (("clients", preset.clients), ("dataset_size", preset.dataset_sizes), ("parameters", widths)):
        measured = cross[f"{sweep}_measured"]
        assert min(values) < measured < max(values)
        assert measured == pytest.approx(cross[f"{sweep}_formula"], rel=0.05)
        m = frame[(frame.sweep == sweep) & (frame.source == "measured")].pivot_table(
            index=sweep, columns="method", values="bytes_per_client")
        below, above = m[m.index < measured], m[m.index > measured]
        cheaper_split_below = sweep == "dataset_size"  # little data per client favours split learning, as do
                                                       # more clients and bigger models
        assert ((below.split < below.federated) == cheaper_split_below).all()
        assert ((above.split > above.federated) == cheaper_split_below).all()


def test_the_communication_figure_draws_four_labelled_log_panels_and_saves(singh, tmp_path):
    preset, frame = singh
    fig, axes = preset.plot(frame)
    assert axes.shape == (3, 2)
    fig.canvas.draw()
    major, minor = ([t.get_text() for t in axes[1, 0].get_xticklabels(minor=m) if t.get_text()] for m in (False, True))
    assert "100" in major and "200" in minor and not any("^" in t for t in major + minor)  # plain numbers
    for ax in axes.flat:
        assert ax.get_xscale() == ax.get_yscale() == "log" and "per epoch" in ax.get_ylabel() and ax.get_xlabel()
        assert len(ax.lines) >= 5  # two formulas, two measured, the crossover marker
    png, csv = preset.save(frame, tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(pd.read_csv(csv)) == len(frame)
    with pytest.raises(ValueError, match="non-empty DataFrame"):
        preset.save(pd.DataFrame(), tmp_path)


@pytest.mark.parametrize("changes, message", [
    (dict(clients=(1, 4)), "at least 2 clients"), (dict(clients=(4,)), "at least two values"),
    (dict(cut=4), "cut must leave the last hidden layer"), (dict(server_widths=(8,)), "at least two values"), (dict(dataset_size=10, clients=(2, 8)), "fewer than 2 samples"),
    (dict(lr=0), "lr")])
def test_bad_communication_settings_are_refused_by_name(changes, message):
    with pytest.raises(ValueError, match=message):
        SinghCommunication(**{**SinghCommunication.smoke().settings(), **changes})


# -- Vepakomma et al. 2018: FLOPs and bytes ------------------------------------------------------
def test_flops_are_counted_for_what_each_party_computes():
    x = torch.randn(4, 5)
    assert client_flops(nn.Linear(5, 3), x) == 2 * (2 * 4 * 5 * 3)  # forward, weight gradient (no input gradient)
    two = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))
    forward = 2 * 4 * (5 * 3 + 3 * 2)
    assert training_flops(two, x, 2) == forward + 2 * 4 * (5 * 3 + 3 * 2) + 2 * 4 * 3 * 2  # + the input grad of layer 2


def test_the_cifar_networks_have_their_published_sizes():
    assert sum(p.numel() for p in resnet50().parameters()) == 23_705_252
    assert sum(p.numel() for p in vgg16().parameters()) == 14_719_818
    assert vgg16(width=1 / 16)(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert resnet50(width=1 / 16)(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_split_health_scales_per_client_costs_with_the_data_each_client_holds():
    preset = SplitHealth.smoke()
    frame = preset.run()
    m = frame[frame.source == "measured"].set_index(["quantity", "method", "clients"]).value
    assert m["compute", "split", 100] == pytest.approx(5 * m["compute", "split", 500])
    assert m["compute", "federated", 100] == pytest.approx(5 * m["compute", "federated", 500])
    assert m["bandwidth", "federated", 100] == m["bandwidth", "federated", 500] == 2 * frame.attrs["parameters"] * 4
    stem = round(64 / 16)  # the stem's channels at width 1/16: q = 4 x 32 x 32 values a sample
    assert frame.attrs["split_per_sample"] == 2 * stem * 32 * 32 * 4
    assert m["bandwidth", "split", 100] == 500 * frame.attrs["split_per_sample"] + frame.attrs["handoff"]
    published = frame[frame.source == "published"].set_index(["quantity", "method", "clients"]).value
    assert published["compute", "split", 100] == 0.1548e12 and published["bandwidth", "split", 500] == 1.2e9
    assert len(published) == sum(len(v) for v in PUBLISHED.values())
    ratios = SplitHealth.ratios(frame).set_index(["quantity", "clients", "source"]).split_over_federated
    assert ratios["bandwidth", 100, "published"] == pytest.approx(2.0)
    assert ratios["compute", 500, "measured"] == pytest.approx(m["compute", "split", 500] / m["compute", "federated", 500])
    fig, axes = preset.plot(frame)
    assert len(axes) == 3 and all(ax.get_ylabel() for ax in axes) and axes[0].get_yscale() == "log"


def test_split_health_refuses_a_cut_the_network_does_not_have():
    with pytest.raises(ValueError, match="no cut point 'conv9'"):
        SplitHealth(compute_cut="conv9")
    with pytest.raises(ValueError, match="multiple of 32"):
        SplitHealth(image_size=40)


# -- the ring on loan defaults -------------------------------------------------------------------
def test_the_ring_and_centralized_training_are_compared_epoch_by_epoch():
    preset = RingLoan(epochs=4, samples=1_000, seeds=(0, 1))
    frame = preset.run()
    assert len(frame) == 2 * 2 * 4 and set(frame.method) == {"ring", "centralized"}
    assert (frame[frame.method == "ring"].bytes > 0).all() and (frame[frame.method == "centralized"].bytes == 0).all()
    summary = preset.summary(frame)
    assert len(summary) == 4 and summary.epochs_to_convergence.between(1, 4).all()
    assert (summary[summary.method == "centralized"].gap_to_centralized == 0).all()
    ring = summary[summary.method == "ring"].set_index("seed")
    central = summary[summary.method == "centralized"].set_index("seed")
    assert ring.gap_to_centralized.tolist() == pytest.approx((ring.best_test_loss / central.best_test_loss - 1).tolist())
    assert frame.attrs["base_rate_loss"] == pytest.approx(0.5, abs=0.02)  # 20% defaults: -0.2 ln 0.2 - 0.8 ln 0.8
    assert frame.test_loss.max() < frame.attrs["base_rate_loss"]  # both learn something
    fig, axes = preset.plot(frame)
    assert len(axes) == 3 and "validation loss" in axes[0].get_ylabel()
    with pytest.raises(ValueError, match="at least 2 nodes"):
        RingLoan(nodes=1)


# -- make figures ---------------------------------------------------------------------------------
def test_make_figures_writes_each_png_and_csv_and_an_index_with_the_anchors(tmp_path, capsys):
    generate(["08_ring_loan"], out=tmp_path, smoke=True)
    assert main(["--smoke", "--only", "06_split_health", "--out", str(tmp_path), "--no-progress", "--threads", "1"]) == 0
    assert "06_split_health" in capsys.readouterr().out
    for name in ("06_split_health", "08_ring_loan"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / f"{name}.csv").is_file()
    index = (tmp_path / "index.html").read_text()
    assert index.count("<section") == 2  # the earlier run's figure is kept
    assert "0.1548 TFLOPs" in index and "within 5% of centralized" in index and "smoke settings" in index
    with pytest.raises(ValueError, match="unknown figure"):
        generate(["99_nothing"], out=tmp_path)
    (tmp_path / "index.json").write_text("{not json")  # a damaged ledger is rebuilt from the run
    generate(["08_ring_loan"], out=tmp_path, smoke=True)
    assert (tmp_path / "index.html").read_text().count("<section") == 1


def test_every_figure_has_a_preset_with_its_source_and_anchors_and_is_importable_from_experiments():
    from toolkit import experiments

    assert list(FIGURES) == sorted(FIGURES)
    for name, cls in FIGURES.items():
        assert cls.name == name and cls.source and cls.anchors and isinstance(cls.smoke(), cls)
        assert getattr(experiments, cls.__name__) is cls
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        experiments.Nothing
