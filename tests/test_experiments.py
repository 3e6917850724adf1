"""Sweeps: one tidy row per value and seed; a split trial trains with the defense it is given
(hook or wire transform) and measures what the server received; the trade-off plot."""
import matplotlib

matplotlib.use("Agg")
import pytest
import torch

from toolkit import experiments
from toolkit.experiments import SplitExperiment, sweep
from toolkit.plots import plot_tradeoff
from toolkit.split import Hook


def test_sweep_rows_follow_values_and_seeds_and_stop_keeps_rows():
    calls = []

    def trial(v, seed):
        calls.append((v, seed))
        if v == 3:
            raise KeyboardInterrupt
        return {"score": v + 10 * seed}

    frame = sweep(trial, [1, 2, 3], seeds=[0, 1], parameter="k")
    assert frame[["k", "seed", "score"]].values.tolist() == [[1, 0, 1], [1, 1, 11], [2, 0, 2], [2, 1, 12]]
    assert (frame["seconds"] >= 0).all() and calls[-1] == (3, 0)
    with pytest.raises(ValueError, match="at least one value"):
        sweep(trial, [], seeds=[0])
    with pytest.raises(ValueError, match="parameter"):
        sweep(trial, [1], parameter="seed")


class Scale:
    """A wire transform that scales activations (and counts its calls)."""

    def __init__(self, factor):
        self.factor, self.calls = factor, 0

    def __call__(self, t, *, kind):
        if kind != "activations":
            return t
        self.calls += 1
        return t * self.factor

    def report(self):
        return {"calls": self.calls}


class Counted(Hook):
    """A loss hook adding alpha * mean(z^2) on the client's cut-layer outputs; counts its calls."""

    def __init__(self, alpha):
        self.alpha, self.calls = alpha, 0

    def loss(self, step, inputs, outputs):
        self.calls += 1
        return self.alpha * outputs.square().mean()

    def report(self):
        return {"hook_calls": self.calls}


class Noise:
    """Gaussian noise on the activations, drawn from the defense's generator."""

    def __init__(self, sigma, generator):
        self.sigma, self.generator = sigma, generator

    def __call__(self, t, *, kind):
        return t + self.sigma * torch.randn(t.shape, generator=self.generator) if kind == "activations" else t


def test_a_split_trial_measures_what_the_server_received():
    exp = SplitExperiment.smoke()
    plain = exp.run(None, seed=0)
    assert plain["accuracy"] > 0.5 and 0.5 < plain["dcor"] <= 1.0 and plain["bytes"] > 0
    scaled = exp.run(Scale(0.0), seed=0)  # the server receives zeros: dCor is undefined -> 0, training fails
    assert scaled["calls"] > 0 and scaled["dcor"] == pytest.approx(0.0) and scaled["accuracy"] < 0.3
    again = exp.run(None, seed=0)
    assert again["accuracy"] == plain["accuracy"] and again["dcor"] == plain["dcor"]  # same seed, same numbers


def test_dcor_unbiased_is_the_bias_corrected_statistic_on_the_same_tensors():
    """Every row reports dcor_unbiased = sqrt(max(u_distance_correlation_sqr, 0)) on exactly the
    tensors dcor is computed on: the first n_eval test inputs and what the server received for them."""
    import math

    from toolkit import dependence
    from toolkit.split import SplitConfig, SplitNN
    from toolkit.wire import Wire

    exp = SplitExperiment.smoke()
    row = exp.run(None, seed=0)
    ds = exp.load()
    client, server = exp.parts(0)  # the same run, by hand: same seed, same numbers
    sl = SplitNN.vanilla(client, server, ds, config=SplitConfig(batch_size=exp.batch_size, lr=exp.lr, seed=0),
                         wire=Wire())
    sl.fit(epochs=exp.epochs)
    sl.evaluate()
    z = torch.cat([t.tensor.flatten(1) for t in sl.wire.observed(by="server", kind="activations", phase="eval")])
    x, z = ds.x_test[: exp.n_eval], z[: exp.n_eval]
    assert row["dcor"] == float(dependence.distance_correlation(x, z))
    assert row["dcor_unbiased"] == math.sqrt(max(float(dependence.u_distance_correlation_sqr(x, z)), 0.0))
    assert 0 < row["dcor_unbiased"] < row["dcor"]  # dependent data, biased-upward V-statistic
    scaled = exp.run(Scale(0.0), seed=0)  # zeros: no dependence measurable, both 0
    assert scaled["dcor_unbiased"] == 0.0 == scaled["dcor"]
    diverged = exp.run(Scale(float("inf")), seed=0)
    assert math.isnan(diverged["dcor_unbiased"]) and math.isnan(diverged["dcor"])


def test_training_transcript_and_optimizer_settings():
    """record_training=False keeps only the evaluation traffic (and still scores it); optimizer= is
    both parties' optimizer."""
    from dataclasses import replace

    seen = {}

    def attack(sl, ds, generator):
        seen["phases"] = {t.phase for t in sl.wire.observed()}
        seen["optimizers"] = {type(p.optimizer).__name__ for p in sl.parties}
        return {}

    exp = replace(SplitExperiment.smoke(), record_training=False, optimizer="adam", lr=1e-2)
    row = exp.run(None, seed=0, attack=attack)
    assert seen["phases"] == {"eval"} and 0.5 < row["dcor"] <= 1.0 and row["accuracy"] > 0.5
    assert seen["optimizers"] == {"Adam"}
    full = []
    SplitExperiment.smoke().run(None, seed=0,
                                attack=lambda sl, ds, g: full.append({t.phase for t in sl.wire.observed()}) or {})
    assert full == [{"train", "eval"}]
    with pytest.raises(ValueError, match="optimizer"):
        SplitExperiment(optimizer="lion")
    with pytest.raises(ValueError, match="record_training"):
        SplitExperiment(record_training=1)


def test_a_split_sweep_passes_each_value_and_a_seeded_generator_to_the_defense():
    got = []

    def defense(sigma, generator):
        got.append((sigma, generator.initial_seed()))
        return Noise(sigma, generator) if sigma else None

    def attack(sl, ds, generator):
        return {"n_seen": len(sl.wire.observed(by="server", kind="activations"))}

    frame = SplitExperiment.smoke().sweep(defense, [0.0, 3.0], parameter="sigma", seeds=[0, 1], attack=attack)
    assert got == [(0.0, 0), (0.0, 1), (3.0, 0), (3.0, 1)]
    assert list(frame.columns[:2]) == ["sigma", "seed"]
    assert {"accuracy", "dcor", "n_seen", "attack_seconds"} <= set(frame.columns)
    mean = frame.groupby("sigma")["dcor"].mean()
    assert mean[3.0] < mean[0.0] - 0.1  # the server received noisy activations
    assert frame.loc[frame.sigma == 3.0, "dcor"].nunique() == 2  # the seeds drew different noise


def test_a_hook_defense_is_registered_for_the_defended_party():
    hook = Counted(1.0)
    row = SplitExperiment.smoke().run(hook, seed=0)
    assert row["hook_calls"] == 3 * 8  # every training step of 3 epochs over 512 samples


def test_a_diverged_run_reports_nan_dcor_instead_of_failing():
    row = SplitExperiment.smoke().run(Scale(float("inf")), seed=0)
    assert row["dcor"] != row["dcor"]  # NaN


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="labels"):
        SplitExperiment(labels="nobody")
    with pytest.raises(ValueError, match="unknown model"):
        SplitExperiment(model="resnet")
    with pytest.raises(ValueError, match="epochs"):
        SplitExperiment(epochs=0)
    with pytest.raises(TypeError, match="defense factory"):
        SplitExperiment.smoke().run(3.0)


def test_tradeoff_plot_draws_means_with_spread(tmp_path):
    frame = sweep(lambda a, s: {"dcor": 0.9 - 0.1 * a + 0.01 * s, "accuracy": 0.95 - 0.01 * a}, [0, 1, 2],
                  seeds=[0, 1, 2], parameter="alpha")
    fig, ax = plot_tradeoff(frame, x="dcor", y="accuracy")
    line = ax.containers[0].lines[0]
    assert line.get_xdata().tolist() == pytest.approx([0.91, 0.81, 0.71])
    assert "3 seeds" in ax.get_title() and ax.get_xlabel().startswith("distance correlation")
    fig.savefig(tmp_path / "tradeoff.png")
    with pytest.raises(ValueError, match="no column 'psnr'"):
        plot_tradeoff(frame, x="psnr")
