"""UnSplit (Erdogan, Küpçü, Çiçek, WPES 2022): data-oblivious inversion, and label inference.

The victim is always a SplitNN whose client part has real (briefly trained) weights; the
attacker builds its clone from a factory of the same architecture, or from a module whose
weights it never reads (checked by poisoning them with NaN). Settings are small; speed is
measured in benchmarks/inversion_attacks.py, not here.

The tests use victim seed 0; the comments beside the thresholds give the margins measured
over other seeds.
"""
import dataclasses
import functools

import pytest
import torch
from torch import nn

from attacks.base import AttackResult
from attacks.unsplit import UnSplit, architecture_of
from attacks.unsplit_labels import UnSplitLabels, relabel
from toolkit import data, models
from toolkit.metrics import evaluate
from toolkit.split import SplitConfig, SplitNN
from toolkit.wire import Wire


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny networks run fastest on one thread


def train_victim(build, at, ds, *, steps, seed=0):
    """A vanilla SplitNN on ``ds`` trained for ``steps`` batches of 8; returns the attacked step's
    activations (as the server got them), the ground truth for scoring, the factory and the victim."""
    torch.manual_seed(seed)
    client, server = models.cut(build(), at=at)
    sl = SplitNN.vanilla(client, server, ds, config=SplitConfig(batch_size=8, lr=0.02, momentum=0.9, seed=seed))
    done = 0
    while done < steps:
        for _ in sl.steps():
            done += 1
            if done == steps:
                break
    last = sl.wire.step
    observed = [t for t in sl.wire.observed(by="server", kind="activations") if t.step == last]
    truth = ds.x_train[sl.batches[last]]
    return observed, truth, (lambda: models.cut(build(), at=at)[0]), client


def identified(rec, truth):
    """How many reconstructions are closest (MSE) to their own original among the batch."""
    d = torch.cdist(rec.flatten(1), truth.flatten(1))  # (N, N)
    return int((d.argmin(1) == torch.arange(len(rec))).sum())


# -- inversion -----------------------------------------------------------------------------------
def test_mnist_first_conv_layer_is_recognizable(shared_data):
    ds = data.load("mnist", root=shared_data / "mnist")
    ds = ds.subset(torch.arange(2000))
    observed, truth, factory, victim = train_victim(lambda: models.lenet(image_size=28), "act1", ds, steps=300)
    before = {k: v.clone() for k, v in victim.state_dict().items()}
    result = UnSplit(factory, input_shape=(1, 28, 28)).run(observed, generator=torch.Generator().manual_seed(0))
    scores = evaluate(result, truth)
    black = evaluate(AttackResult("black", reconstruction=torch.zeros_like(truth)), truth)
    # The thresholds of the unsplit module docstring; they held for every victim seed measured (0-7).
    assert scores["ssim"] >= 0.5, scores
    assert scores["ssim"] > black["ssim"], (scores, black)  # MNIST is mostly background: black scores 0.42
    assert scores["psnr"] >= 15, scores
    assert black["ssim"] == pytest.approx(0.42, abs=0.01) and black["psnr"] == pytest.approx(10.0, abs=0.1), black
    assert identified(result.reconstruction, truth) == len(truth)
    assert all(torch.equal(before[k], v) for k, v in victim.state_dict().items())


@functools.lru_cache(maxsize=None)
def digits_inversion(at: str) -> dict:
    ds = data.load("digits")
    observed, truth, factory, _ = train_victim(models.convnet, at, ds, steps=300)
    result = UnSplit(factory, input_shape=(1, 8, 8)).run(observed, generator=torch.Generator().manual_seed(0))
    return {**evaluate(result, truth), "identified": identified(result.reconstruction, truth)}


def test_digits_first_conv_layer_is_recovered():
    # 16 channels of 3x3 convolutions over 64 pixels: 16 numbers per pixel pin the clone and the
    # input down; SSIM 0.999-1.000 and PSNR 37-42 dB over victim seeds 0-3.
    scores = digits_inversion("act1")
    assert scores["ssim"] >= 0.9, scores
    assert scores["psnr"] >= 30, scores
    assert scores["identified"] == 8


def test_quality_falls_as_the_cut_moves_deeper():
    # Seeds 0-3: SSIM 1.00 / 0.27-0.54 / -0.10-0.12 and PSNR 37-42 / 9.3-11.7 / 6.6-7.7 dB at
    # conv1 + ReLU / + pool / conv2 + ReLU.
    ssim = {at: digits_inversion(at)["ssim"] for at in ("act1", "pool1", "act2")}
    psnr = {at: digits_inversion(at)["psnr"] for at in ("act1", "pool1", "act2")}
    assert ssim["act1"] > ssim["pool1"] + 0.2 > ssim["act2"] + 0.1, ssim
    assert psnr["act1"] > psnr["pool1"] > psnr["act2"], psnr


def test_the_attack_never_reads_the_client_weights():
    torch.manual_seed(0)
    victim = models.cut(models.convnet(), at="act1")[0]
    x = torch.rand(4, 1, 8, 8)
    wire = Wire()
    wire.send(victim(x).detach(), sender="client", receiver="server", kind="activations")
    with torch.no_grad():
        for p in victim.parameters():
            p.fill_(float("nan"))  # any read of a value would poison the clone
    skeleton = architecture_of(victim)
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    attack = UnSplit(victim, input_shape=(1, 8, 8), restarts=1)
    del victim  # the attack keeps no reference to it
    result = attack.run(wire.observed(by="server"), max_steps=3, generator=torch.Generator().manual_seed(1))
    clone = result.extras["clone"]
    assert all(torch.isfinite(p).all() for p in clone.parameters())
    assert torch.isfinite(result.reconstruction).all() and len(result.history) == 3
    again = UnSplit(lambda: models.cut(models.convnet(), at="act1")[0], input_shape=(1, 8, 8), restarts=1)
    same = again.run(wire.observed(by="server"), max_steps=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(same.reconstruction, result.reconstruction)  # same architecture, same draws


def test_smoke_settings_stay_in_bounds_and_the_best_is_kept_on_interrupt():
    torch.manual_seed(0)
    factory = lambda: models.cut(models.convnet(), at="act1")[0]  # noqa: E731
    wire = Wire()
    wire.send(factory()(torch.rand(4, 1, 8, 8)).detach(), sender="client", receiver="server", kind="activations")
    for parametrization in ("clamp", "sigmoid"):
        result = UnSplit(factory, input_shape=(1, 8, 8), parametrization=parametrization, stretch="image").run(
            wire.observed(by="server"), max_steps=2)
        assert result.reconstruction.shape == (4, 1, 8, 8) and len(result.history) == 2
        assert 0 <= float(result.reconstruction.min()) and float(result.reconstruction.max()) <= 1
    assert "reconstruction (4, 1, 8, 8)" in repr(result)

    calls = {"n": 0}

    class Interrupting(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = factory()

        def forward(self, x):
            calls["n"] += 1
            if calls["n"] > 45:  # the first call is the shape check; then 20 + 20 per outer step
                raise KeyboardInterrupt
            return self.inner(x)

    result = UnSplit(Interrupting, input_shape=(1, 8, 8), restarts=1).run(wire.observed(by="server"))
    assert result.extras["interrupted"] and len(result.history) == 1
    assert result.reconstruction.shape == (4, 1, 8, 8)


def test_bad_input_is_rejected_with_a_clear_message():
    factory = lambda: models.cut(models.lenet(image_size=28), at="act1")[0]  # noqa: E731
    for bad in ({"steps": 0}, {"input_steps": -1}, {"model_lr": 0}, {"tv_weight": -1.0}, {"restarts": 0},
                {"parametrization": "tanh"}, {"stretch": "global"}, {"bounds": (1, 0)}, {"input_shape": (0, 2)}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            UnSplit(factory, **{"input_shape": (1, 28, 28), **bad})
    with pytest.raises(ValueError, match="tabular"):
        UnSplit(factory, input_shape=(30,))
    with pytest.raises(ValueError, match="nn.Module or a callable"):
        UnSplit("lenet", input_shape=(1, 28, 28))

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

    with pytest.raises(ValueError, match="reset_parameters"):
        UnSplit(Custom(), input_shape=(3,), tv_weight=0)

    # an image attack on tabular activations: the clone's output does not match them
    tab = data.load("breast_cancer")
    sl = SplitNN.vanilla(*models.cut(models.tabular_mlp(30, 2), at="act1"), tab.subset(torch.arange(64)),
                         config=SplitConfig(batch_size=32))
    sl.fit(epochs=1)
    with pytest.raises(ValueError, match="observed activations have shape"):
        UnSplit(factory, input_shape=(1, 28, 28)).run(sl.wire.observed(by="server"), max_steps=1)
    with pytest.raises(ValueError, match="needs transfers of kind 'activations'"):
        UnSplit(factory, input_shape=(1, 28, 28)).run(sl.wire.observed(by="client"), max_steps=1)
    with pytest.raises(ValueError, match="max_steps"):
        UnSplit(factory, input_shape=(1, 28, 28)).run(sl.wire.observed(by="server"), max_steps=0)
    with pytest.raises(ValueError, match="sent by 'hospital'"):
        UnSplit(factory, input_shape=(1, 28, 28), sender="hospital").run(sl.wire.observed(by="server"))


# -- label inference -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def u_shaped_run(digits):
    """U-shaped SplitNN on digits whose client keeps only the last layer (one Linear, 128 -> 10):
    the first five batches of 32; the server's view and the ground truth."""
    torch.manual_seed(0)
    head, middle, tail = models.cut(models.convnet(), at=["act1", "flatten"])
    assert [type(m) for m in tail] == [nn.Linear]
    sl = SplitNN.u_shaped(head, middle, tail, digits, config=SplitConfig(batch_size=32, lr=0.05, momentum=0.9))
    for step, *_ in sl.steps():
        if step == 5:
            break
    assert not sl.wire.observed(kind="labels")  # the labels never left the client
    observed = sl.wire.observed(by="server", kind="gradients") + \
        sl.wire.observed(by="client", kind="activations", sender="server")  # what the server sent itself
    labels = torch.cat([digits.y_train[sl.batches[s]] for s in range(1, 6)])
    return observed, labels


def test_labels_are_recovered_exactly_when_the_client_keeps_only_the_last_layer(u_shaped_run):
    observed, labels = u_shaped_run
    factory = lambda: nn.Linear(128, 10)  # noqa: E731
    # from gradients alone: the right partition (labels up to a renaming of the classes) ...
    blind = UnSplitLabels(factory).run(observed, generator=torch.Generator().manual_seed(0))
    assert bool((relabel(blind.labels, labels) == labels).all())
    assert blind.extras["fits"][blind.extras["start"]] < 0.01
    # ... and with one labelled example per class, the labels themselves
    known = {int((labels == c).nonzero()[0]): c for c in range(10)}
    named = UnSplitLabels(factory, known=known).run(observed, generator=torch.Generator().manual_seed(0))
    assert evaluate(named, labels=labels)["label_accuracy"] == 1.0
    assert bool(named.extras["named"].all())


def test_the_papers_start_alone_is_not_enough(u_shaped_run):
    # The paper's relabeling from an untrained clone finds a coarser partition (67 % over 5 seeds).
    observed, labels = u_shaped_run
    result = UnSplitLabels(lambda: nn.Linear(128, 10), init="clone").run(
        observed, generator=torch.Generator().manual_seed(0))
    assert float((relabel(result.labels, labels) == labels).float().mean()) < 0.95


def test_label_inference_rejects_a_transcript_it_cannot_use(u_shaped_run):
    observed, _ = u_shaped_run
    factory = lambda: nn.Linear(128, 10)  # noqa: E731
    grads_only = [t for t in observed if t.kind == "gradients"]
    with pytest.raises(ValueError, match="activations 'server' sent"):
        UnSplitLabels(factory).run(grads_only)
    with pytest.raises(ValueError, match="needs transfers of kind 'gradients'"):
        UnSplitLabels(factory).run([t for t in observed if t.kind == "activations"])
    with pytest.raises(ValueError, match="cannot take the observed activations"):
        UnSplitLabels(lambda: nn.Linear(64, 10)).run(observed, max_steps=1)
    with pytest.raises(ValueError, match="only 160 gradients"):
        UnSplitLabels(factory, known={500: 1}).run(observed, max_steps=1)
    for bad in ({"init": "random"}, {"rounds": 0}, {"fit_steps": 0}, {"known": {0: -1}}, {"reduction": "max"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            UnSplitLabels(factory, **bad)


def test_label_inference_smoke_setting_gives_a_label_per_sample(u_shaped_run):
    observed, labels = u_shaped_run
    result = UnSplitLabels(lambda: nn.Linear(128, 10)).run(observed, max_steps=1,
                                                           generator=torch.Generator().manual_seed(0))
    assert len(result.history) == 1
    assert result.labels.shape == labels.shape
    assert int(result.labels.min()) >= 0 and int(result.labels.max()) < 10


# -- what the attacks read must fit what they were given, and the generator drives every draw ------
def _server_view(z):
    wire = Wire()
    wire.send(z, sender="client", receiver="server", kind="activations")
    return wire.observed(by="server")


def test_a_transcript_of_another_model_or_with_non_finite_values_is_refused():
    factory = lambda: models.cut(models.convnet(), at="act1")[0]  # noqa: E731  (4, 16, 8, 8) activations
    attack = UnSplit(factory, input_shape=(1, 8, 8), restarts=1)
    for z in (torch.rand(4, 32, 4, 4),   # another model's cut
              torch.rand(4, 1, 8, 8)):   # broadcastable against the clone's (4, 16, 8, 8)
        with pytest.raises(ValueError, match=r"the clone maps inputs of shape \(1, 8, 8\) to \(16, 8, 8\) per "
                                             r"sample, but the observed activations have shape"):
            attack.run(_server_view(z), max_steps=1)
    z = torch.rand(4, 16, 8, 8)
    z[3, 0, 1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"UnSplit: the activations client -> server at step 0 holds Inf at index "
                                         r"\(3, 0, 1, 2\)"):
        attack.run(_server_view(z), max_steps=1)


def test_label_inference_refuses_gradients_that_do_not_fit(u_shaped_run):
    observed, _ = u_shaped_run
    factory = lambda: nn.Linear(128, 10)  # noqa: E731
    first = [t for t in observed if t.step == 1]
    grads = next(t for t in first if t.kind == "gradients")
    acts = [t for t in first if t.kind == "activations"]
    for g in (grads.tensor[:, :64],  # another model's tail input
              grads.tensor[:, :1]):  # broadcastable against (32, 128)
        with pytest.raises(ValueError, match=r"the gradients \(32, \d+\) do not match the activations \(32, 128\)"):
            UnSplitLabels(factory).run([dataclasses.replace(grads, tensor=g)] + acts, max_steps=1)
    nan = grads.tensor.clone()
    nan[5, 7] = float("nan")
    with pytest.raises(ValueError, match=r"UnSplitLabels: the gradients client -> server at step 1 holds NaN at "
                                         r"index \(5, 7\)"):
        UnSplitLabels(factory).run([dataclasses.replace(grads, tensor=nan)] + acts, max_steps=1)


def test_same_generator_same_numbers_whatever_the_global_rng(u_shaped_run):
    torch.manual_seed(0)
    factory = lambda: models.cut(models.convnet(), at="act1")[0]  # noqa: E731
    seen = _server_view(factory()(torch.rand(4, 1, 8, 8)).detach())
    observed, _ = u_shaped_run
    first = [t for t in observed if t.step == 1]
    runs = {
        "UnSplit": lambda g: UnSplit(factory, input_shape=(1, 8, 8), restarts=2, screen_steps=1).run(
            seen, max_steps=2, generator=g).reconstruction,
        "UnSplitLabels": lambda g: UnSplitLabels(lambda: nn.Linear(128, 10), init="features", fit_steps=5,
                                                 ce_steps=5).run(first, max_steps=1, generator=g).extras["clone"].weight,
    }
    for name, run in runs.items():
        out = []
        for seed in (0, 0, 1):
            torch.manual_seed(100 + len(out))  # a different global state before every run
            out.append(run(torch.Generator().manual_seed(seed)))
        assert torch.equal(out[0], out[1]), name
        assert not torch.equal(out[0], out[2]), name
