"""Feature-space hijacking (FSHA) and the SplitGuard detector on 8x8 digits (pixels in [0, 1]).

One attacked run (module fixture) serves several tests: the reconstruction MSE on the client's
private batches falls below 0.05, SplitGuard flags the server before it does, everything crossed
the Wire, and the trained decoder inverts fresh activations from a transcript. An honest run of
the same length is not flagged. Settings are small so the file runs in well under a minute.
"""
import time
from types import SimpleNamespace

import pytest
import torch

from attacks.fsha import FeatureSpaceHijacking
from defenses.splitguard import SplitGuard, guarded_split_training
from toolkit import audit, data, metrics, models
from toolkit.wire import Wire

STEPS = 400        # client steps of the attacked and of the honest run
TARGET = 0.05      # reconstruction MSE the attack must get below (pixels in [0, 1])
WINDOW = 50        # steps per window when comparing the start and the end of the curve


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny networks run fastest on one thread


@pytest.fixture(scope="module")
def parts(digits):
    """The client's private images and labels, and the server's disjoint public images."""
    order = torch.randperm(len(digits.x_train), generator=torch.Generator().manual_seed(0))
    private, public = order[: len(order) // 2], order[len(order) // 2:]
    return SimpleNamespace(x=digits.x_train[private], y=digits.y_train[private], public=digits.x_train[public])


def _client(seed: int = 0):
    torch.manual_seed(seed)
    return models.cut(models.convnet(width=16), at="conv2")  # client: conv1, act1, pool1, conv2


@pytest.fixture(scope="module")
def attacked(parts):
    client, _ = _client()
    wire = Wire()
    guard = SplitGuard(generator=torch.Generator().manual_seed(1))
    fsha = FeatureSpaceHijacking()
    start = time.perf_counter()
    result = fsha.attack_training(client, parts.x, parts.public, steps=STEPS, wire=wire,
                                  generator=torch.Generator().manual_seed(0), detector=guard, private_y=parts.y)
    seconds = time.perf_counter() - start
    mse = result.history
    crossed = next((step for step, m in zip(result.extras["steps"], mse) if m < TARGET), None)
    return SimpleNamespace(client=client, wire=wire, guard=guard, fsha=fsha, result=result, mse=mse,
                           crossed=crossed, seconds=seconds)


# -- the attack ----------------------------------------------------------------------------------
def test_fsha_drives_private_reconstruction_mse_below_target(attacked):
    mse = attacked.mse
    first, last = sum(mse[:WINDOW]) / WINDOW, sum(mse[-WINDOW:]) / WINDOW
    summary = (f"MSE first {WINDOW} steps {first:.4f}, last {WINDOW} {last:.4f}, first below {TARGET} at step "
               f"{attacked.crossed}, {len(mse)} steps in {attacked.seconds:.1f} s")
    assert len(mse) == STEPS, summary
    assert attacked.crossed is not None and attacked.crossed < 200, summary
    assert last < 0.04, summary  # the docstring's figure: 0.035 over steps 351-400
    assert first > 2.5 * last, summary  # the error falls by a clear factor over training
    assert first > 0.08, summary        # and it starts high: the client's features are not invertible at first


def test_trained_decoder_inverts_fresh_activations_from_a_transcript(attacked, digits):
    held_out = digits.x_test  # never used in training by either party
    wire = Wire()
    with torch.no_grad(), wire.during("eval"):
        wire.send(attacked.client(held_out), sender="client", receiver="server", kind="activations")
    result = attacked.fsha.run(wire.observed(by="server"))
    scores = metrics.evaluate(result, held_out)
    mean_image = float(metrics.mse(held_out.mean(0, keepdim=True).expand_as(held_out), held_out).mean())
    assert result.reconstruction.shape == held_out.shape
    assert scores["mse"] < TARGET and scores["mse"] < mean_image / 2, (scores, mean_image)


def test_everything_crossed_the_wire_and_no_raw_input_did(attacked, parts):
    ledger = attacked.wire.ledger().set_index(["sender", "receiver", "kind"])["transfers"].to_dict()
    assert ledger == {("client", "server", "activations"): STEPS, ("client", "server", "labels"): STEPS,
                      ("server", "client", "gradients"): STEPS}
    seen = attacked.wire.observed(by="server")
    assert {t.kind for t in seen} == {"activations", "labels"}
    assert audit.find_rows(seen, parts.x) == []


# -- the detector --------------------------------------------------------------------------------
def test_splitguard_flags_the_attack_before_mse_drops_below_target(attacked):
    guard = attacked.guard
    assert guard.flagged, guard.scores
    assert guard.flagged_at < min(50, attacked.crossed), (guard.flagged_at, attacked.crossed)
    assert attacked.result.extras["flagged_at"] == guard.flagged_at
    fakes = sum(attacked.result.extras["fake"])
    assert 0 < fakes < STEPS / 2 and len(guard.scores) <= fakes
    assert sorted(guard.scores)[len(guard.scores) // 2] < guard.threshold  # most scores are low


def test_splitguard_does_not_flag_honest_split_training(parts):
    client, server = _client()
    guard = SplitGuard(generator=torch.Generator().manual_seed(1))
    wire = Wire()
    history = guarded_split_training(client, server, parts.x, parts.y, guard=guard, steps=STEPS, batch_size=32,
                                     lr=3e-3, wire=wire, generator=torch.Generator().manual_seed(0))
    assert not guard.flagged and guard.flagged_at is None, guard.scores
    assert len(guard.scores) > 20 and sum(s > 0.9 for s in guard.scores) >= 0.95 * len(guard.scores)
    regular = history.loc[~history.fake, "loss"]
    assert regular.tail(WINDOW).mean() < 0.5 * regular.head(20).mean()  # the honest task is learnt
    assert {t.kind for t in wire.observed(by="client")} == {"gradients"}


def test_splitguard_example_scores():
    guard = SplitGuard(fake_every=2, warmup=0, window=1, generator=torch.Generator().manual_seed(0))
    assert guard.should_send_fake(3) == guard.should_send_fake(3)  # one decision per step
    y = torch.arange(10)
    fake = guard.fake_labels(y, 10)
    assert (fake != y).all() and fake.min() >= 0 and fake.max() < 10
    assert guard.score() is None
    assert guard.observe(1, torch.ones(4), fake=True) is None  # no regular gradients yet


# -- smoke, reproducibility, bad input -----------------------------------------------------------
def test_smoke_max_steps(parts):
    client, _ = _client()
    result = FeatureSpaceHijacking().attack_training(client, parts.x, parts.public, steps=STEPS, max_steps=3,
                                                     generator=torch.Generator().manual_seed(0))
    assert len(result.history) == 3
    assert result.reconstruction.shape == (32, 1, 8, 8) and len(result.extras["rows"]) == 32
    assert "fsha" in repr(result) and "malicious server" in repr(FeatureSpaceHijacking())


def test_same_seed_same_numbers(parts):
    runs = [FeatureSpaceHijacking().attack_training(_client()[0], parts.x, parts.public, max_steps=4,
                                                    generator=torch.Generator().manual_seed(3)).history
            for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("kwargs", [{"steps": 0}, {"steps": -5}, {"batch_size": 0}, {"gp_weight": -1.0},
                                    {"lr_client": 0.0}, {"critic_steps": 0}, {"width": 1.5}])
def test_bad_hyperparameters(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        FeatureSpaceHijacking(**kwargs)


def test_bad_training_input(parts):
    client, _ = _client()
    fsha = FeatureSpaceHijacking()
    for bad in ({"steps": 0}, {"steps": -1}, {"max_steps": 0}, {"batch_size": -2}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            fsha.attack_training(client, parts.x, parts.public, **bad)
    tabular = data.load("breast_cancer").x_train  # (N, 30)
    tab_client, _ = models.cut(models.tabular_mlp(30, 2), at="act1")
    with pytest.raises(ValueError, match="image attack.*tabular"):
        fsha.attack_training(tab_client, tabular, tabular, max_steps=1)
    with pytest.raises(ValueError, match="private_y"):
        fsha.attack_training(client, parts.x, parts.public, max_steps=1, detector=SplitGuard())
    with pytest.raises(ValueError, match="differ in shape"):
        fsha.attack_training(client, parts.x, torch.rand(10, 1, 16, 16), max_steps=1)


def test_bad_transcripts(parts):
    fsha = FeatureSpaceHijacking()
    wire = Wire()
    wire.send(torch.rand(4, 64), sender="client", receiver="server", kind="activations")
    with pytest.raises(ValueError, match="no decoder yet"):
        fsha.run(wire.observed(by="server"))
    fsha.attack_training(_client()[0], parts.x, parts.public, max_steps=1)  # decoder for (32, 4, 4) features
    with pytest.raises(ValueError, match=r"\(32, 4, 4\).*\(64,\)"):  # tabular-shaped activations
        fsha.run(wire.observed(by="server"))
    grads = Wire()
    grads.send(torch.rand(4, 32, 4, 4), sender="server", receiver="client", kind="gradients")
    with pytest.raises(ValueError, match="needs transfers of kind 'activations'.*gradients"):
        fsha.run(grads.observed())
    with pytest.raises(ValueError, match="nothing"):
        fsha.run([])
    other, _ = models.cut(models.convnet(width=16), at="pool1")  # (16, 4, 4) features
    with pytest.raises(ValueError, match=r"trained on smashed data of shape \(32, 4, 4\)"):
        fsha.attack_training(other, parts.x, parts.public, max_steps=1)


@pytest.mark.parametrize("kwargs", [{"fake_every": 1}, {"threshold": 0.0}, {"threshold": 1.5}, {"warmup": -1},
                                    {"window": 0}, {"mult": 0}])
def test_splitguard_bad_settings(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SplitGuard(**kwargs)


def test_splitguard_needs_a_gradient():
    with pytest.raises(ValueError, match="backpropagate first"):
        SplitGuard().observe(20, None, fake=False)
