"""DLG, iDLG and Inverting Gradients on real FedAvg updates, and the shared gradient-matching core."""
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from attacks import ATTACKS, DLG, IDLG, InvertingGradients
from attacks.gradient_inversion import idlg_label
from attacks.gradient_matching import cosine_distance, optimize, read_updates
from toolkit import data, metrics, models, seed_everything
from toolkit.federated import ClientData, FedConfig, FederatedAveraging
from toolkit.split import SplitConfig, SplitNN
from toolkit.wire import Transfer

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
SHAPE = (1, 32, 32)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny networks run fastest on one thread


def dlg_lenet(image_size=32, seed=1):
    return models.init_uniform_(models.lenet(image_size=image_size, variant="dlg"),
                                generator=torch.Generator().manual_seed(seed))


def one_round(model, ds, groups, **config):
    """One FedAvg round in which client i holds the samples ``groups[i]``; returns what the server
    received and sent (updates and weights)."""
    seed_everything(0)
    clients = ClientData.from_indices(ds, [torch.as_tensor(g) for g in groups])
    fl = FederatedAveraging(model, clients, test=ds, config=FedConfig(**config))
    fl.fit(1)
    return fl.wire.observed(by="server", kind="update") + fl.wire.observed(sender="server", kind="weights")


def idlg_accuracy(ds, image_size):
    model = dlg_lenet(image_size)
    g = torch.Generator().manual_seed(3)
    idx = torch.randperm(len(ds.y_train), generator=g)[:200]
    observed = one_round(model, ds, [[i] for i in idx.tolist()], batch_size=1, lr=0.1)
    updates = read_updates(observed, model, lr=0.1, attack="test")
    assert [u.sender for u in updates] == [f"client:{i}" for i in range(200)]
    labels = torch.tensor([idlg_label(u.gradient) for u in updates])
    return float((labels == ds.y_train[idx]).double().mean())


def test_idlg_labels_are_exact_over_200_single_samples(digits32):
    assert idlg_accuracy(digits32, 32) == 1.0


@pytest.mark.skipif(not MNIST.exists(), reason="../shared/data/mnist is absent")
def test_idlg_labels_are_exact_over_200_mnist_samples():
    assert idlg_accuracy(data.load("mnist", root=MNIST), 28) == 1.0


@pytest.mark.parametrize("attack", ["dlg", "idlg", "inverting_gradients"])
def test_single_image_is_recovered_above_40_db(digits32, attack):
    model = dlg_lenet()
    idx = [[5], [17]]
    observed = one_round(model, digits32, idx, batch_size=1, lr=0.1)
    kwargs = {"restarts": 2, "adam_steps": 100} if attack == "inverting_gradients" else {}
    result = ATTACKS[attack](model, input_shape=SHAPE, client_lr=0.1, **kwargs).run(observed)
    truth = digits32.x_train[[5, 17]]
    psnr = metrics.psnr(result.reconstruction, truth)
    assert bool((psnr >= 40).all()), psnr
    assert result.labels.tolist() == digits32.y_train[[5, 17]].tolist()
    assert result.history and result.history[-1] <= result.history[0]


def test_inverting_gradients_needs_its_lbfgs_finish(digits32):
    """The InvertingGradients docstring: the Adam schedule alone (100 steps, 2 restarts) leaves the
    digits of the test above below 20 dB (measured 13-15 dB); with 40 L-BFGS steps they pass 40 dB."""
    model = dlg_lenet()
    observed = one_round(model, digits32, [[5], [17]], batch_size=1, lr=0.1)
    adam_only = InvertingGradients(model, input_shape=SHAPE, client_lr=0.1, restarts=2, adam_steps=100,
                                   lbfgs_steps=0).run(observed, generator=torch.Generator().manual_seed(0))
    psnr = metrics.psnr(adam_only.reconstruction, digits32.x_train[[5, 17]])
    assert bool((psnr < 20).all()), psnr


def test_inverting_gradients_over_a_fedavg_update_of_4_images_and_2_local_steps(digits32):
    model = dlg_lenet()
    idx = [0, 1, 2, 3]
    observed = one_round(model, digits32, [idx], batch_size=4, lr=0.1, local_epochs=2)
    attack = InvertingGradients(model, input_shape=SHAPE, batch_size=4, client_lr=0.1, local_steps=2)
    result = attack.run(observed)  # labels optimized jointly (one-step label counts do not hold after two steps)
    order = metrics.match(result.reconstruction, digits32.x_train[idx])
    assert float(metrics.ssim(result.reconstruction[order], digits32.x_train[idx]).mean()) >= 0.5
    assert result.labels[order].tolist() == digits32.y_train[idx].tolist()


def test_batched_restarts_equal_separate_runs():
    torch.manual_seed(0)
    target = (torch.randn(5),)
    net = nn.Sequential(nn.Linear(3, 5), nn.Sigmoid())

    def objective(x):
        return cosine_distance((net(x).sum(0),), target)

    x0 = torch.randn(3, 2, 3)
    together = optimize(objective, [x0], adam_steps=30, lr=0.05)
    for r in range(3):
        alone = optimize(objective, [x0[r:r + 1]], adam_steps=30, lr=0.05)
        torch.testing.assert_close(together.variables[0][r], alone.variables[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(together.objective[r], alone.objective[0], rtol=1e-5, atol=1e-7)


def test_same_seed_same_reconstruction(digits32):
    """Every draw comes from the run's generator: the global RNG disturbed between runs changes
    nothing, another seed changes the result."""
    model = dlg_lenet()
    observed = one_round(model, digits32, [[0]], batch_size=1, lr=0.1)
    attack = InvertingGradients(model, input_shape=SHAPE, client_lr=0.1, restarts=2, adam_steps=5, lbfgs_steps=1)
    a = attack.run(observed, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(123)
    torch.rand(10)
    b = attack.run(observed, generator=torch.Generator().manual_seed(4))
    c = attack.run(observed, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.reconstruction, b.reconstruction)
    assert not torch.equal(a.reconstruction, c.reconstruction)


def test_without_a_generator_the_draws_come_from_the_global_rng_not_a_constant_seed(digits32):
    model = dlg_lenet()
    observed = one_round(model, digits32, [[0]], batch_size=1, lr=0.1)
    attack = InvertingGradients(model, input_shape=SHAPE, client_lr=0.1, adam_steps=3, lbfgs_steps=0)
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(attack.run(observed).reconstruction)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_label_counts_inside_the_attack_draw_from_the_runs_generator(digits32, monkeypatch):
    import attacks.analytic

    seen = []
    original = attacks.analytic.label_counts

    def spy(*args, generator=None, **kwargs):
        seen.append(generator)
        return original(*args, generator=generator, **kwargs)

    monkeypatch.setattr(attacks.analytic, "label_counts", spy)
    model = dlg_lenet()
    observed = one_round(model, digits32, [[0, 1]], batch_size=2, lr=0.1)
    g = torch.Generator().manual_seed(0)
    InvertingGradients(model, input_shape=SHAPE, batch_size=2, client_lr=0.1, labels="counts", adam_steps=1,
                       lbfgs_steps=0).run(observed, generator=g)
    assert len(seen) == 1 and seen[0] is g


def split_run():
    ds = data.load("digits")
    seed_everything(0)
    client, server = models.cut(models.mlp([64, 32, 10]), at="act1")
    sl = SplitNN.vanilla(client, server, ds, config=SplitConfig(batch_size=16, lr=0.05))
    sl.fit(epochs=1)
    return ds, server, sl


def test_cut_layer_gradients_reveal_labels_to_a_client_that_knows_the_servers_part():
    """The same core on the split side: the client matches the cut-layer gradient it received
    with the server's part, which its threat model must grant explicitly (known_part), and reads
    off the server's labels."""
    ds, server, sl = split_run()
    grads = sl.wire.observed(by="client", kind="gradients")[-2:]  # the server part's weights now
    seen = grads + sl.wire.observed(sender="client", kind="activations")  # what the client received and sent
    attack = DLG(known_part=server, input_shape=(32,), distance="cosine", lbfgs_steps=10)
    assert attack.wrt == "input" and "knowing the part that computed them, weights included" in repr(attack)
    assert "server:" not in attack.threat_model and "honest-but-curious server" not in attack.threat_model
    result = attack.run(seen)
    truth = torch.cat([ds.y_train[sl.batches[t.step]] for t in grads])
    assert result.reconstruction.shape == (sum(len(t.tensor) for t in grads), 32)  # the known activations
    assert float((result.labels == truth).double().mean()) >= 0.95


def test_the_split_side_needs_the_known_part_granted_explicitly():
    _, server = models.cut(models.mlp([64, 32, 10]), at="act1")
    with pytest.raises(ValueError, match="known_part="):
        DLG(server, input_shape=(32,), wrt="input")  # the model a client does not have
    with pytest.raises(ValueError, match="known_part is the split side's"):
        DLG(known_part=server, input_shape=(32,), wrt="parameters")
    with pytest.raises(ValueError, match="weights= says where a federated attack"):
        DLG(known_part=server, input_shape=(32,), weights="model")
    with pytest.raises(ValueError, match="reads a federated update's last layer"):
        DLG(known_part=server, input_shape=(32,), labels="counts")


def test_the_threat_model_says_where_the_weights_come_from(digits32):
    model = dlg_lenet()
    sent = DLG(model, input_shape=SHAPE, client_lr=0.1)
    assert sent.weights == "sent" and "the weights it sent, read from the transcript" in repr(sent)
    current = DLG(model, input_shape=SHAPE, client_lr=0.1, weights="model")
    assert "its model's current weights" in repr(current) and "weights=model" in repr(current)
    with pytest.raises(ValueError, match="weights must be 'sent'"):
        DLG(model, input_shape=SHAPE, weights="live")
    # the weights it sent are required, not silently replaced by the model's current ones
    observed = one_round(model, digits32, [[0]], batch_size=1, lr=0.1)
    updates_only = [t for t in observed if t.kind == "update"]
    with pytest.raises(ValueError, match="no 'weights' transfer to client:0 at step"):
        sent.run(updates_only, max_steps=1)
    assert current.run(updates_only, max_steps=1).reconstruction.shape == (1, *SHAPE)


def test_a_cut_layer_transcript_of_another_model_is_refused():
    _, server = models.cut(models.mlp([64, 32, 10]), at="act1")
    attack = DLG(known_part=server, input_shape=(32,), distance="cosine", lbfgs_steps=1)
    g = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    grads = Transfer(3, "server", "client", "gradients", g)

    def acts(z):
        return Transfer(3, "client", "server", "activations", z)

    with pytest.raises(ValueError, match=r"has shape \(20,\) per sample, but known_part takes input_shape \(32,\)"):
        attack.run([Transfer(3, "server", "client", "gradients", torch.randn(16, 20))])
    with pytest.raises(ValueError, match=r"has shape \(16, 20\), but the gradients .* has \(16, 32\)"):
        attack.run([grads, acts(torch.randn(16, 20))])  # activations of another cut
    with pytest.raises(ValueError, match=r"has shape \(1, 32\), but the gradients .* has \(16, 32\)"):
        attack.run([grads, acts(torch.randn(1, 32))])  # broadcastable: once a silent wrong answer
    with pytest.raises(ValueError, match="3 known labels for the gradients"):
        DLG(known_part=server, input_shape=(32,), labels=torch.tensor([0, 1, 2])).run([grads])


def test_non_finite_or_non_float_transcripts_are_refused(digits32):
    model = dlg_lenet()
    observed = one_round(model, digits32, [[0]], batch_size=1, lr=0.1)
    attack = DLG(model, input_shape=SHAPE, client_lr=0.1)
    poisoned = [dataclasses.replace(t, tensor=t.tensor.clone().index_fill_(0, torch.tensor([7]), float("nan")))
                if t.kind == "update" else t for t in observed]
    with pytest.raises(ValueError, match=r"the update client:0 -> server at step \d+ holds NaN at index 7"):
        attack.run(poisoned)
    inf_weights = [dataclasses.replace(t, tensor=torch.full_like(t.tensor, float("inf")))
                   if t.kind == "weights" else t for t in observed]
    with pytest.raises(ValueError, match="the weights server -> client:0 at step .* holds Inf"):
        attack.run(inf_weights)
    integers = [dataclasses.replace(t, tensor=t.tensor.long()) if t.kind == "update" else t for t in observed]
    with pytest.raises(ValueError, match="holds torch.int64 values; it reads floating-point tensors"):
        attack.run(integers)
    _, server = models.cut(models.mlp([64, 32, 10]), at="act1")
    g = torch.zeros(4, 32)
    g[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"gradients server -> client at step 1 holds NaN at index \(2, 5\)"):
        DLG(known_part=server, input_shape=(32,)).run([Transfer(1, "server", "client", "gradients", g)])


def test_bad_input_is_refused(digits32):
    model = dlg_lenet()
    with pytest.raises(ValueError, match="kind 'update'"):
        DLG(model, input_shape=SHAPE, client_lr=0.1).run([])
    observed = one_round(model, digits32, [[0]], batch_size=1, lr=0.1)
    other = models.lenet(image_size=32, variant="dlg", n_classes=4)
    with pytest.raises(ValueError, match="mismatched parameter shapes"):
        DLG(other, input_shape=SHAPE, client_lr=0.1).run(observed)
    bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 30 * 30, 10))
    with pytest.raises(ValueError, match="BatchNorm"):
        DLG(bn, input_shape=SHAPE)
    with pytest.raises(ValueError, match="lbfgs_steps"):
        DLG(model, input_shape=SHAPE, lbfgs_steps=-1)
    with pytest.raises(ValueError, match="max_steps"):
        DLG(model, input_shape=SHAPE, client_lr=0.1).run(observed, max_steps=0)
    with pytest.raises(ValueError, match="single sample"):
        IDLG(model, input_shape=SHAPE, batch_size=4)
    with pytest.raises(ValueError, match="client_lr"):
        DLG(model, input_shape=SHAPE).run(observed)  # l2 on a weight delta needs the scale
    with pytest.raises(ValueError, match="does not take inputs"):
        DLG(model, input_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="dtype"):
        DLG(model, input_shape=SHAPE, dtype=torch.float16)
    with pytest.raises(ValueError, match="polish_steps"):
        DLG(model, input_shape=SHAPE, polish_steps=-2)
    with pytest.raises(ValueError, match="adam_steps must be a non-negative int, got 2.5"):
        InvertingGradients(model, input_shape=SHAPE, adam_steps=2.5)
    with pytest.raises(ValueError, match="label 12 at index 0, but there are only 10 classes"):
        DLG(model, input_shape=SHAPE, labels=torch.tensor([12]))
    with pytest.raises(ValueError, match="integer class indices"):
        DLG(model, input_shape=SHAPE, labels=torch.tensor([2.7]))  # once truncated to 2
