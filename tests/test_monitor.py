"""TrainingMonitor: it trains exactly as protocol.fit (split, several clients, federated), its
figure updates while training runs (live) or is shown once (static, in a real headless kernel),
and it refuses bad input."""
import os
import warnings
from pathlib import Path

import ipywidgets
import nbformat
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from toolkit import data, models
from toolkit.federated import FederatedAveraging, FedConfig
from toolkit.plots import plot_training
from toolkit.report import execute
from toolkit.split import SplitConfig, SplitFed, SplitNN
from toolkit.split.leakage import LeakageProbe
from toolkit.widgets.monitor import TrainingMonitor, static_mode

PNG = b"\x89PNG\r\n\x1a\n"
SGD = SplitConfig(lr=0.05, momentum=0.9, batch_size=64, record=False)


@pytest.fixture(scope="module")
def small(digits):
    return digits.subset(range(400))  # 400 training samples: 7 steps of 64 per epoch (the last of 16)


def split_run(small, seed=0):
    torch.manual_seed(seed)
    client, server = models.cut(models.mlp([64, 32, 10]), at=2)
    probe = LeakageProbe(small.x_test[:50], client, every=2)
    return SplitNN.vanilla(client, server, small, config=SGD, hooks={"client": probe})


@pytest.mark.parametrize("static", [True, False])
def test_split_history_equals_a_plain_fit(small, static):
    plain, monitored = split_run(small), split_run(small)
    want = plain.fit(epochs=3, eval_each_epoch=True)
    monitor = TrainingMonitor(monitored, metrics=["loss", "accuracy", "dcor"], every=2, static=static)
    got = monitor.fit(epochs=3, eval_each_epoch=True)
    assert got.equals(want) and monitored.history.equals(plain.history) and monitor.history.equals(want)
    assert {"dcor", "test_accuracy"} <= set(got.columns) and monitored.epoch == plain.epoch == 3
    more_plain, more = plain.fit(epochs=1), monitor.fit(epochs=1)  # a second call continues the run
    assert more.equals(more_plain) and monitor.history.equals(plain.history)


def test_the_live_figure_updates_while_training_runs(small):
    monitor = TrainingMonitor(split_run(small), metrics=["loss", "dcor"], every=1, static=False)
    images = []
    box = monitor.widget
    status, bar, image = box.children
    image.observe(lambda change: images.append((change["new"], bar.value)), names="value")
    monitor.fit(epochs=3)  # 21 steps, a redraw after any step once the last one took < 1/5 of the time
    assert len(images) == monitor.redraws >= 2 and all(png[:8] == PNG for png, _ in images)
    steps = [at for _, at in images]
    assert steps[0] < 21 and steps[-1] == 21 == bar.max and steps == sorted(steps)  # mid-run, then the end
    assert len({png for png, _ in images}) == len(images)  # each redraw shows new points
    assert images[0][1] == 0 and monitor._figure.axes[0].get_xlim() == pytest.approx((0, 21 * 1.03))  # whole run
    assert status.value.startswith("done: SplitNN: epoch 3, step 21") and "dcor" in status.value
    assert "leaklab-monitor" in box._dom_classes and "leaklab-monitor-figure" in image._dom_classes
    ids = [w.model_id for w in (box, status, bar, image)]
    with warnings.catch_warnings():  # Widget.widgets: ipywidgets' kernel-wide registry (deprecated name)
        warnings.simplefilter("ignore", DeprecationWarning)
        registered = ipywidgets.Widget.widgets  # it keeps every widget alive until closed
    assert all(i in registered for i in ids)
    monitor.close()
    assert not any(i in registered for i in ids) and all(w.comm is None for w in (box, status, bar, image))
    assert monitor.widget is not box  # a new live view when it is needed again


def test_static_mode_draws_once_and_comes_from_the_environment(small, monkeypatch):
    for var in ("LEAKLAB_STATIC", "LEAKLAB_SMOKE"):
        monkeypatch.delenv(var, raising=False)
    assert static_mode()  # pytest is no Jupyter kernel
    monkeypatch.setenv("LEAKLAB_STATIC", "1")
    assert static_mode()
    monitor = TrainingMonitor(split_run(small), every=1)
    assert monitor.static and "static" in repr(monitor)
    monitor.fit(epochs=2)
    assert monitor.redraws == 1 and monitor._widget is None  # no widget made without a front end


def test_several_clients_and_federated_histories_equal_plain_fits(small):
    parts = data.partition(small, 3, seed=0)

    def splitfed():
        torch.manual_seed(1)
        client, server = models.cut(models.mlp([64, 32, 10]), at=2)
        return SplitFed(client, server, parts, config=SGD)

    want = splitfed().fit(epochs=2, eval_each_epoch=True)
    got = TrainingMonitor(splitfed(), metrics=["loss", "test_accuracy"], every=1, static=False).fit(
        epochs=2, eval_each_epoch=True)
    assert got.equals(want)

    def fedavg():
        torch.manual_seed(2)
        return FederatedAveraging(models.mlp([64, 32, 10]), parts, config=FedConfig(seed=3))

    plain = fedavg()
    want = plain.fit(rounds=4)
    monitor = TrainingMonitor(fedavg(), metrics=["loss", "accuracy"], every=1, static=False)
    got = monitor.fit(rounds=4)
    wall = ["seconds"]  # wall-clock time of each round
    assert got.drop(columns=wall).equals(want.drop(columns=wall)) and got["round"].tolist() == [1, 2, 3, 4]
    assert torch.equal(monitor.protocol.weights, plain.weights)
    assert got.attrs["manifest"]["round"] == 4 and monitor.redraws >= 2


def test_the_figure_has_a_labelled_panel_per_metric_and_names_a_missing_column(small):
    history = split_run(small).fit(epochs=2, eval_each_epoch=True)
    fig, axes = plot_training(history, ["loss", "accuracy", "dcor", "epsilon"], x="step", fig=Figure())
    assert len(axes) == 4 and [ax.get_xlabel() for ax in axes] == ["training step (batches)"] * 4
    assert [ax.get_title() for ax in axes] == ["loss", "accuracy", "leakage at the cut", "epsilon"]
    assert axes[2].get_ylabel() == "distance correlation dCor" and axes[2].get_ylim() == (-0.02, 1.02)
    assert [t.get_text() for t in axes[1].get_legend().get_texts()] == ["training batch", "test set"]
    assert len(axes[1].lines[1].get_xdata()) == 2  # the test accuracy: one point per epoch
    assert len(axes[2].lines[0].get_xdata()) == history["dcor"].notna().sum() == 8  # 2, 4, 6, 7, 8, ..., 14
    assert "no 'epsilon' values yet" in axes[3].texts[0].get_text()
    again, axes2 = plot_training(history.iloc[:3], ["loss", "accuracy", "dcor", "epsilon"], x="step", fig=fig)
    assert again is fig and axes2 == axes and len(axes[0].lines[0].get_xdata()) == 3  # redrawn in place


def test_a_missing_metric_warns_after_training(small):
    monitor = TrainingMonitor(split_run(small), metrics=["loss", "epsilon"], static=True)
    with pytest.warns(UserWarning, match=r"no column \['epsilon'\] to plot"):
        history = monitor.fit(epochs=1)
    assert len(history) == 7


@pytest.mark.parametrize("kwargs, message", [
    ({"protocol": nn.Linear(2, 2)}, "TrainingMonitor trains a SplitNN"),
    ({"metrics": "loss"}, "metrics must be a non-empty list"),
    ({"metrics": []}, "metrics must be a non-empty list"),
    ({"metrics": ["loss", "loss"]}, "metrics must be distinct"),
    ({"every": 0}, "every must be a positive int"),
    ({"static": "yes"}, "static must be"),
])
def test_bad_arguments_are_refused(small, kwargs, message):
    args = {"protocol": split_run(small), **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        TrainingMonitor(args.pop("protocol"), **args)


def test_bad_fit_arguments_are_refused_before_training(small):
    sl = split_run(small)
    monitor = TrainingMonitor(sl, static=True)
    for kwargs, message in (({"rounds": 2}, "trains in epochs"), ({"epochs": 0}, "epochs must be a positive int"),
                            ({}, "epochs must be a positive int")):
        with pytest.raises(ValueError, match=message):
            monitor.fit(**kwargs)
    fl = TrainingMonitor(FederatedAveraging(models.mlp([64, 10]), data.partition(small, 2)), static=True)
    with pytest.raises(ValueError, match="trains in rounds"):
        fl.fit(epochs=2)
    assert sl.wire.step == 0 and len(sl.history) == 0  # nothing trained


NOTEBOOK = """\
from toolkit import data, models
from toolkit.split import SplitNN
from toolkit.split.leakage import LeakageProbe
from toolkit.widgets.monitor import TrainingMonitor
ds = data.load("digits").subset(range(300))
client, server = models.cut(models.mlp([64, 32, 10]), at=2)
sl = SplitNN.vanilla(client, server, ds, hooks={"client": LeakageProbe(ds.x_test[:40], client, every=1)})
history = TrainingMonitor(sl, metrics=["loss", "accuracy", "dcor"], every=1).fit(epochs=2)
print(len(history))
"""


@pytest.mark.parametrize("live", [False, True])
def test_in_a_headless_kernel_static_shows_one_png_and_live_a_widget(tmp_path, monkeypatch, live):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    path = tmp_path / "monitor.ipynb"
    # a headless run (execute sets LEAKLAB_STATIC=1) is static; a kernel that unsets it stands for a front end
    first = 'import os\nos.environ["LEAKLAB_STATIC"] = "0"\n' if live else ""
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(first + NOTEBOOK)]), path)
    outputs = execute(path, smoke=False, threads=1).cells[0].outputs
    kinds = [k for o in outputs for k in o.get("data", {})]
    assert "10\n" in "".join(o.get("text", "") for o in outputs if o.get("name") == "stdout")
    if not live:  # the static fallback, one PNG
        assert kinds.count("image/png") == 1 and "application/vnd.jupyter.widget-view+json" not in kinds
    else:  # a kernel with a (presumed) front end: the live widget (its view), no PNG output
        assert kinds.count("application/vnd.jupyter.widget-view+json") == 1 and "image/png" not in kinds


def test_static_mode_is_one_check_for_every_dashboard(monkeypatch):
    from toolkit.widgets import explorer, frontend, monitor

    assert explorer.static_mode is frontend.static_mode is monitor.static_mode
    monkeypatch.delenv("LEAKLAB_STATIC", raising=False)
    monkeypatch.delenv("LEAKLAB_SMOKE", raising=False)
    assert frontend.static_mode()  # no Jupyter kernel here (pytest)
