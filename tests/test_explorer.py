"""The leakage explorer: cached, stoppable runs (logic without a front end), its controls' DOM classes,
bad input shown in the status line with the dashboard still usable, and the static fallback."""
import subprocess
import sys
import threading
from functools import partial

import pytest
import torch

from attacks.explorer import EXPLORER_ATTACKS, inverse_network, white_box_inversion
from defenses.explorer import EXPLORER_DEFENSES
from toolkit import data
from toolkit.widgets import ExplorerSession, LeakageExplorer, Setting
from toolkit.widgets.session import DATASETS

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = {"digits": lambda: data.load("digits"), "breast_cancer": lambda: data.load("breast_cancer")}
ATTACKS = {"white-box inversion": partial(white_box_inversion, steps=40),
           "inverse network": partial(inverse_network, epochs=2)}
PNG = b"\x89PNG\r\n\x1a\n"
CLASSES = ["explorer", "dataset", "model", "defense", "attack", "cut", "strength", "run", "stop", "progress",
           "status", "reconstruction", "attribution", "scores"]


def session(**kw):
    return ExplorerSession(defenses=EXPLORER_DEFENSES, attacks=ATTACKS, datasets=DATA, **kw)


def explorer(**kw):
    return LeakageExplorer(defenses=EXPLORER_DEFENSES, attacks=ATTACKS, datasets=DATA, epochs=1, **kw)


def test_changing_only_the_attack_reuses_the_trained_model():
    s = session()
    first = s.run(Setting(epochs=1))
    other = s.run(Setting(epochs=1, attack="inverse network"))
    assert (s.trainings, s.attack_runs) == (1, 2)
    assert other.cached == {"training": True, "attack": False} and other.accuracy == first.accuracy
    again = s.run(Setting(epochs=1))  # the same setting: nothing is recomputed
    assert (s.trainings, s.attack_runs) == (1, 2) and again.cached == {"training": True, "attack": True}
    assert torch.equal(again.reconstruction, first.reconstruction)
    s.run(Setting(epochs=1, defense="Gaussian noise", strength=0.5))  # a new defense strength trains again
    assert s.trainings == 2


def test_a_run_scores_what_the_server_received_and_is_the_same_for_the_same_seed():
    a, b = session().run(Setting(epochs=1)), session().run(Setting(epochs=1))
    assert 0.5 < a.accuracy <= 1 and 0 < a.dcor <= 1 and a.scores["ssim"] > 0.3 and a.scores["psnr"] > 10
    assert a.reconstruction.shape == a.originals.shape == a.attribution.shape == (8, 1, 8, 8)
    assert (a.accuracy, a.dcor, a.scores) == (b.accuracy, b.dcor, b.scores)
    assert torch.equal(a.reconstruction, b.reconstruction) and torch.equal(a.attribution, b.attribution)
    noisy = session().run(Setting(epochs=1, defense="Gaussian noise", strength=3.0))
    assert noisy.dcor < a.dcor and noisy.scores["ssim"] < a.scores["ssim"]  # the defense acts on what crossed


@pytest.mark.parametrize("dataset, model, accuracy", [("digits", "mlp", 0.93), ("digits", "convnet", 0.95),
                                                      ("digits 28x28", "lenet", 0.82)])
def test_two_epochs_reach_the_accuracy_the_training_settings_note(dataset, model, accuracy):
    s = ExplorerSession(defenses=EXPLORER_DEFENSES, attacks=ATTACKS,
                        datasets={dataset: DATASETS[dataset]})
    out = s.run(Setting(dataset=dataset, model=model, cut="pool1" if model != "mlp" else "act1"))
    assert out.accuracy == pytest.approx(accuracy, abs=0.03)


def test_a_stopped_run_keeps_the_partly_trained_model_and_is_not_cached():
    s, stop, seen = session(), threading.Event(), []

    def progress(done, total, what):
        seen.append((done, total, what))
        if what == "training" and done == 3:
            stop.set()

    out = s.run(Setting(epochs=1), stop=stop, on_progress=progress)
    assert out.stopped and out.steps == 3 and out.total_steps == 45  # 1,437 digits / batch 32
    assert [d for d, _, w in seen if w == "training"] == [1, 2, 3] and seen[-1][2] == "done"
    assert out.reconstruction.shape == out.originals.shape and 0 <= out.accuracy <= 1
    full = s.run(Setting(epochs=1))
    assert s.trainings == 2 and not full.stopped and full.steps == 45 and full.accuracy > out.accuracy


def test_a_run_uses_the_sessions_thread_count_and_restores_torchs():
    before, during = torch.get_num_threads(), []
    session(threads=1).run(Setting(epochs=1), on_progress=lambda *a: during.append(torch.get_num_threads()))
    assert set(during) == {1} and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be a positive int"):
        session(threads=0)


def test_tabular_data_is_attacked_in_feature_units_and_attributed_per_feature():
    s = session()
    out = s.run(Setting(dataset="breast_cancer", model="tabular_mlp", cut="act1", epochs=1))
    assert out.reconstruction.shape == out.originals.shape == (8, 30) and set(out.scores) == {"mse"}
    assert out.scores["mse"] < float(out.originals.var())  # better than guessing the mean
    from toolkit.widgets import figures

    fig = figures.attribution_figure(out)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(fig.axes[0].patches) == 12 and set(labels) <= set(out.feature_names)


def test_mnist_is_offered_only_when_its_files_are_there(tmp_path, monkeypatch, shared_data):
    monkeypatch.setenv("LEAKLAB_DATA", str(tmp_path))
    assert "mnist" not in ExplorerSession(defenses=EXPLORER_DEFENSES, attacks=ATTACKS).available_datasets()
    monkeypatch.setenv("LEAKLAB_DATA", str(shared_data))
    s = ExplorerSession(defenses=EXPLORER_DEFENSES, attacks=ATTACKS, datasets={"mnist": DATASETS["mnist"]})
    assert s.available_datasets() == ["mnist"] and s.dataset("mnist").shape == (1, 28, 28)


@pytest.mark.parametrize("bad, message", [
    (dict(cut="conv1"), "cut layer 'conv1' does not exist in mlp"),
    (dict(defense="cut dropout", strength=1.5), r"cut dropout rate must be a number in \[0.0, 0.95\], got 1.5"),
    (dict(strength=-1.0, defense="NoPeek"), r"NoPeek alpha must be a number in \[0.0, 10.0\]"),
    (dict(model="lenet"), "model 'lenet' does not fit dataset 'digits'"),
    (dict(attack="dlg"), "unknown attack 'dlg'"),
])
def test_bad_input_is_refused_in_words(bad, message):
    with pytest.raises(ValueError, match=message):
        session().check(Setting(**bad))


def test_every_control_carries_its_css_class_and_the_cut_offers_the_models_layers():
    e = explorer()
    found = {}

    def walk(w):
        for c in getattr(w, "_dom_classes", ()):
            found[c] = w
        for child in getattr(w, "children", ()):
            walk(child)

    walk(e.widget)
    assert sorted(found) == sorted(f"leaklab-{c}" for c in CLASSES)
    assert found["leaklab-run"].description == "Run" and found["leaklab-stop"].description == "Stop"
    assert type(found["leaklab-cut"]).__name__ == "SelectionSlider" and e.cut.options == ("fc1", "act1")
    assert type(found["leaklab-reconstruction"]).__name__ == "Image"
    e.defense.value = "cut dropout"
    assert (e.strength.min, e.strength.max, e.strength.value, e.strength.disabled) == (0.0, 0.95, 0.5, False)


def test_bad_input_shows_in_the_status_and_the_dashboard_stays_usable():
    e = explorer()
    assert e.run() is not None
    image, scores = e.reconstruction.value, e.scores.value
    assert image[:8] == PNG and "SSIM" in scores
    assert e.run(cut="conv1") is None
    assert "does not exist in mlp" in e.status.value and "act1" in e.status.value
    assert e.run(defense="Gaussian noise", strength=7.0) is None and "sigma must be a number" in e.status.value
    assert (e.reconstruction.value, e.scores.value, e.run_button.disabled) == (image, scores, False)
    e.cut.value = "fc1"  # still usable: a new setting runs and gives a new image
    assert e.run() is not None and e.reconstruction.value != image and "Done" in e.status.value


def test_switching_model_moves_a_cut_the_new_model_lacks_and_says_so():
    e = explorer()
    e.cut.value = "fc1"
    e.model.value = "convnet"
    assert e.cut.value == "pool1" and "convnet has no layer 'fc1'" in e.status.value
    e.dataset.value = "breast_cancer"
    assert e.model.value == "tabular_mlp" and e.cut.options == ("fc1", "act1", "fc2", "act2")
    assert e.run() is not None and e.attribution.value[:8] == PNG


def test_the_run_button_runs_in_the_background_with_live_progress_and_stop_keeps_what_it_has():
    e = explorer()
    values = []
    e.progress.observe(lambda change: values.append(change["new"]), names="value")
    progress = e._progress

    def stop_at_five(done, total, what):
        progress(done, total, what)
        if what == "training" and done == 5:
            e.stop_button.click()

    e._progress = stop_at_five
    assert e.stop_button.disabled
    e.run_button.click()
    e.wait(60)
    assert "Stopped after 5 of 45 training steps" in e.status.value and e.outcome.stopped
    assert values[:5] == [1, 2, 3, 4, 5] and e.progress.value == e.progress.max == 46
    assert e.reconstruction.value[:8] == PNG and "STOPPED" in e.scores.value
    assert e.stop_button.disabled and not e.run_button.disabled
    e._progress = progress
    e.run_button.click()
    e.wait(60)
    assert "Done" in e.status.value and not e.outcome.stopped and e.session.trainings == 2


def test_without_a_front_end_displaying_runs_once_and_shows_pngs(monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs: shown.extend(objs))
    monkeypatch.setenv("LEAKLAB_STATIC", "1")
    monkeypatch.delenv("LEAKLAB_SMOKE", raising=False)
    e = explorer()
    e._ipython_display_()
    kinds = [type(o).__name__ for o in shown]
    assert kinds == ["Image", "Image", "HTML"] and all(o.data[:8] == PNG for o in shown[:2])
    assert "test accuracy" in shown[2].data and e.session.trainings == 1
    monkeypatch.setattr("toolkit.widgets.explorer.static_mode", lambda: False)  # a kernel with a front end
    shown.clear()
    e._ipython_display_()
    assert shown == [e.widget] and e.session.trainings == 1


def test_the_ready_made_registries_and_toolkit_importing_neither_attacks_nor_defenses():
    assert list(EXPLORER_ATTACKS) == ["white-box inversion", "inverse network"]
    assert list(EXPLORER_DEFENSES) == ["none", "Gaussian noise", "cut dropout", "NoPeek"]
    code = "import sys, toolkit.widgets; print(sorted(m for m in sys.modules if m.split('.')[0] in ('attacks', 'defenses')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
