"""Analytic attacks on federated updates: exact batch label counts from the last layer's gradient,
exact inputs from a fully connected layer (one sample, or one per bin of an imprint block), and
the bad input they refuse."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from attacks.analytic import AnalyticFC, LabelCounts, imprint_block, label_counts
from toolkit import metrics, models, seed_everything
from toolkit.federated import FedConfig, FederatedAveraging
from toolkit.parties import flat_state
from toolkit.wire import Wire

LR = 0.1


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny networks run fastest on one thread



def _lenet(init: str) -> nn.Module:
    model = models.lenet(in_channels=1, image_size=32, variant="dlg")
    if init == "uniform":
        for p in model.parameters():
            nn.init.uniform_(p, -0.5, 0.5)
    return model


def _gradient(model, weights, x, y):
    return grad(lambda p: F.cross_entropy(functional_call(model, p, (x,)), y))(weights)


def _batch(ds, size, g):
    """A random batch whose first half repeats one label (with repeated labels from B = 2 on)."""
    idx = torch.randint(0, len(ds.y_train), (size,), generator=g)
    x, y = ds.x_train[idx], ds.y_train[idx].clone()
    y[: (size + 1) // 2] = y[0]
    return x, y


def _transcript(fl):
    return fl.wire.observed(by="server") + fl.wire.observed(sender="server", kind="weights")


# -- label counts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["default", "uniform"])
def test_label_counts_are_exact_for_batches_up_to_eight(digits32, init):
    g = seed_everything(0)
    exact, total = 0, 0
    for _ in range(12):  # 12 fresh models x batch sizes 1..8 = 96 batches
        model = _lenet(init)
        weights = {k: v.detach() for k, v in model.named_parameters()}
        for size in range(1, 9):
            x, y = _batch(digits32, size, g)
            counts = label_counts(_gradient(model, weights, x, y), model, weights, batch_size=size,
                                  input_shape=(1, 32, 32), generator=g)
            assert counts.dtype == torch.int64 and counts.shape == (10,) and int(counts.sum()) == size
            exact += bool(torch.equal(counts, torch.bincount(y, minlength=10)))
            total += 1
    assert exact == total == 96


def test_label_counts_without_bias_use_the_weight_row_sums(digits32):
    g = seed_everything(1)
    exact = 0
    for _ in range(6):
        model = _lenet("default")
        model.fc = nn.Linear(768, 10, bias=False)
        weights = {k: v.detach() for k, v in model.named_parameters()}
        for size in range(1, 9):
            x, y = _batch(digits32, size, g)
            counts = label_counts(_gradient(model, weights, x, y), model, weights, batch_size=size,
                                  input_shape=(1, 32, 32), generator=g)
            exact += bool(torch.equal(counts, torch.bincount(y, minlength=10)))
    assert exact == 48


def test_label_counts_warn_when_the_batch_exceeds_the_classes(digits32):
    g = seed_everything(2)
    model = _lenet("default")
    weights = {k: v.detach() for k, v in model.named_parameters()}
    x, y = _batch(digits32, 12, g)
    with pytest.warns(UserWarning, match="batch size 12 .*10 classes"):
        counts = label_counts(_gradient(model, weights, x, y), model, weights, batch_size=12,
                              input_shape=(1, 32, 32), generator=g)
    assert torch.equal(counts, torch.bincount(y, minlength=10))


def test_label_counts_attack_reads_a_fedavg_round(digits32):
    g = seed_everything(3)
    model = _lenet("uniform")
    clients = []
    for _ in range(4):  # four clients of four samples, each with a repeated label
        idx = torch.randint(0, len(digits32.y_train), (4,), generator=g)
        part = digits32.subset(idx)
        part.y_train[:2] = part.y_train[0]
        clients.append(part)
    fl = FederatedAveraging(model, clients, config=FedConfig(batch_size=4, lr=LR))
    fl.fit(1)
    attack = LabelCounts(model=model, input_shape=(1, 32, 32), batch_size=4, client_lr=LR)
    result = attack.run(_transcript(fl), generator=g)
    truth = torch.stack([torch.bincount(c.y_train, minlength=10) for c in clients])
    assert torch.equal(result.extras["counts"], truth)
    assert torch.equal(result.labels, torch.cat([c.y_train.sort().values for c in clients]))
    assert result.attack == "label_counts" and result.extras["senders"] == [f"client:{i}" for i in range(4)]

    with pytest.raises(ValueError, match="client_lr"):
        LabelCounts(model=model, input_shape=(1, 32, 32), batch_size=4).run(_transcript(fl))


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(queries=-3), dict(client_lr=0.0),
                                 dict(input_shape=(1, 0, 32))])
def test_label_counts_refuse_bad_hyperparameters(bad):
    kwargs = dict(model=_lenet("default"), input_shape=(1, 32, 32), batch_size=4) | bad
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name.split("_")[0]):
        LabelCounts(**kwargs)


# -- exact inputs from a fully connected layer ------------------------------------------------------
def test_analytic_fc_recovers_single_samples_from_fedavg(digits):
    seed_everything(4)
    model = models.mlp([64, 128, 10])
    idx = [3, 17, 40]
    fl = FederatedAveraging(model, [digits.subset([i]) for i in idx], config=FedConfig(batch_size=8, lr=LR))
    fl.fit(1)
    result = AnalyticFC(model=model, input_shape=(1, 8, 8)).run(_transcript(fl))
    truth = digits.x_train[idx]
    assert result.reconstruction.shape == (3, 1, 8, 8)
    psnr = metrics.psnr(result.reconstruction, truth)
    assert float(psnr.min()) >= 60, psnr
    assert metrics.evaluate(result, truth)["psnr"] >= 60


def test_analytic_fc_reads_a_hand_computed_gradient_through_a_wire(digits):
    seed_everything(5)
    model = models.mlp([64, 32, 10])
    x, y = digits.x_train[7:8], digits.y_train[7:8]
    F.cross_entropy(model(x), y).backward()
    wire = Wire()
    flat = torch.cat([p.grad.flatten() for p in model.parameters()])
    wire.send(flat, sender="client:0", receiver="server", kind="gradients")
    with pytest.raises(ValueError, match="no 'weights' transfer to client:0"):  # no silent fallback
        AnalyticFC(model=model, layer="fc1").run(wire.observed(by="server"))
    attack = AnalyticFC(model=model, layer="fc1", input_shape=(1, 8, 8), weights="model")  # computed at them
    assert "its model's current weights" in repr(attack)
    result = attack.run(wire.observed(by="server"))
    assert float(metrics.psnr(result.reconstruction, x)[0]) >= 60


def test_analytic_fc_recovers_one_image_per_singleton_bin(digits):
    """An 8-image batch through imprint bins + an MLP in a real FedAvg round: every image alone in
    its bin is recovered exactly, and only those (seeds chosen so that some bins hold two)."""
    brightness = digits.x_train.flatten(1).mean(1)  # (N,) the server's public estimate of its spread
    recovered, singletons = [], []
    for seed, n_bins in [(0, 64), (1, 64), (2, 128), (3, 128)]:
        g = seed_everything(seed)
        block = imprint_block((1, 8, 8), n_bins, mean=float(brightness.mean()), std=float(brightness.std()))
        model = nn.Sequential(block, models.mlp([64, 128, 10]))
        cuts = (-block[1].bias.detach()).sort().values  # (k,) thresholds, before training moves them
        sel = torch.randperm(len(digits.y_train), generator=g)[:8]
        fl = FederatedAveraging(model, [digits.subset(sel)], config=FedConfig(batch_size=8, lr=LR))
        fl.fit(1)
        result = AnalyticFC(model=model, input_shape=(1, 8, 8)).run(_transcript(fl))
        truth = digits.x_train[sel]
        rec = result.reconstruction  # (R, 1, 8, 8), one per non-empty bin
        best = torch.stack([metrics.psnr(rec, t.expand_as(rec)).max() for t in truth])  # (8,) per image
        occupancy = torch.bincount(torch.searchsorted(cuts, brightness[sel]), minlength=n_bins + 1)[1:]
        assert result.extras["found"] == [int((occupancy > 0).sum())]
        recovered.append(int((best >= 60).sum()))
        singletons.append(int((occupancy == 1).sum()))
    assert recovered == singletons
    assert min(recovered) >= 4 and sum(recovered) < 32  # half of every batch at least; not every image


def test_analytic_fc_detects_or_is_told_about_bins(digits):
    brightness = digits.x_train.flatten(1).mean(1)
    block = imprint_block((1, 8, 8), 32, mean=float(brightness.mean()), std=float(brightness.std()))
    model = nn.Sequential(block, models.mlp([64, 16, 10]))
    x, y = digits.x_train[:8], digits.y_train[:8]
    F.cross_entropy(model(x), y).backward()
    wire = Wire()
    wire.send(torch.cat([p.grad.flatten() for p in model.parameters()]), sender="client:0",
              receiver="server", kind="gradients")
    detected = AnalyticFC(model=model, weights="model").run(wire.observed())
    told = AnalyticFC(model=model, bins=True, weights="model").run(wire.observed())
    single = AnalyticFC(model=model, bins=False, weights="model").run(wire.observed())
    assert len(detected.reconstruction) == len(told.reconstruction) > 1
    assert len(single.reconstruction) == 1


# -- bad input ----------------------------------------------------------------------------------
def test_analytic_attacks_refuse_bad_input(digits):
    model = models.mlp([64, 32, 10])
    with pytest.raises(ValueError, match="needs transfers of kind 'update'.*nothing"):
        AnalyticFC(model=model).run([])
    with pytest.raises(ValueError, match="needs transfers of kind 'update'"):
        LabelCounts(model=model, input_shape=(1, 8, 8), batch_size=2).run([])
    wire = Wire()
    wire.send(torch.zeros(1, 100), sender=("client:0",), receiver="server", kind="update")
    with pytest.raises(ValueError, match="mismatched parameter shapes: the update client:0 -> server at step 0 "
                                         "holds 100 values but the model has 2410 parameters"):
        AnalyticFC(model=model, weights="model").run(wire.observed())
    with pytest.raises(ValueError, match="mismatched parameter shapes"):
        LabelCounts(model=model, input_shape=(1, 8, 8), batch_size=2, client_lr=LR,
                    weights="model").run(wire.observed())
    with pytest.raises(ValueError, match="no 'weights' transfer"):
        LabelCounts(model=model, input_shape=(1, 8, 8), batch_size=2, client_lr=LR).run(wire.observed())
    with pytest.raises(ValueError, match=r"does not take inputs of shape \(1, 28, 28\)"):
        LabelCounts(model=model, input_shape=(1, 28, 28), batch_size=2)
    with pytest.raises(ValueError, match="weights must be 'sent'"):
        AnalyticFC(model=model, weights="live")
    for layer in ("act1", "nope"):
        with pytest.raises(ValueError, match=f"layer {layer!r} is not an nn.Linear with bias"):
            AnalyticFC(model=model, layer=layer)
    no_bias = nn.Sequential(nn.Flatten(), nn.Linear(64, 10, bias=False))
    with pytest.raises(ValueError, match="not an nn.Linear with bias"):
        AnalyticFC(model=no_bias)
    with pytest.raises(ValueError, match="input_shape"):
        AnalyticFC(model=model, input_shape=(1, 4, 4))
    with pytest.raises(ValueError, match="bins"):
        AnalyticFC(model=model, bins="yes")
    bn = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.BatchNorm1d(10))
    with pytest.raises(ValueError, match="BatchNorm"):
        AnalyticFC(model=bn)
    assert flat_state(model).numel() == 64 * 32 + 32 + 32 * 10 + 10  # the size the bad update missed


def test_the_weights_sent_come_from_the_transcript_and_must_fit_the_model(digits):
    """A transcript of another model (its updates and the weights sent) is refused with what does
    not fit; non-finite values are named with their index."""
    seed_everything(6)
    model = models.mlp([64, 32, 10])
    fl = FederatedAveraging(model, [digits.subset([0])], config=FedConfig(batch_size=8, lr=LR))
    fl.fit(1)
    seen = _transcript(fl)
    attacks = [AnalyticFC(model=model), LabelCounts(model=model, input_shape=(1, 8, 8), batch_size=1, client_lr=LR)]
    for attack in attacks:
        assert "the weights it sent, read from the transcript" in attack.threat_model
        attack.run(seen)  # fits
    other = models.mlp([64, 16, 10])
    for attack in (AnalyticFC(model=other), LabelCounts(model=other, input_shape=(1, 8, 8), batch_size=1,
                                                       client_lr=LR)):
        with pytest.raises(ValueError, match="mismatched parameter shapes: the update client:0 -> server"):
            attack.run(seen)
    wrong_weights = [dataclasses.replace(t, tensor=t.tensor[:-3]) if t.kind == "weights" else t for t in seen]
    nan_update = [dataclasses.replace(t, tensor=t.tensor.clone().index_fill_(0, torch.tensor([4]), float("nan")))
                  if t.kind == "update" else t for t in seen]
    for attack in attacks:
        with pytest.raises(ValueError, match="mismatched parameter shapes: the weights server -> client:0"):
            attack.run(wrong_weights)
        with pytest.raises(ValueError, match="the update client:0 -> server at step .* holds NaN at index 4"):
            attack.run(nan_update)


def test_label_counts_and_imprint_bins_draw_from_the_callers_generator(digits32):
    block = lambda seed: imprint_block((1, 8, 8), 16, mean=0.3, std=0.1,  # noqa: E731
                                       generator=torch.Generator().manual_seed(seed))
    state = torch.get_rng_state()
    a = block(0)
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is left alone
    torch.manual_seed(123)
    b, c = block(0), block(1)
    assert torch.equal(a[3].weight, b[3].weight) and not torch.equal(a[3].weight, c[3].weight)
    torch.manual_seed(7)
    d = imprint_block((1, 8, 8), 16, mean=0.3, std=0.1)  # generator=None: the global RNG
    torch.manual_seed(7)
    assert torch.equal(d[3].weight, imprint_block((1, 8, 8), 16, mean=0.3, std=0.1)[3].weight)

    g = seed_everything(8)
    model = _lenet("default")
    weights = {k: v.detach() for k, v in model.named_parameters()}
    x, y = _batch(digits32, 4, g)
    gradient = _gradient(model, weights, x, y)
    runs = []
    for _ in range(2):
        state = torch.get_rng_state()
        runs.append(label_counts(gradient, model, weights, batch_size=4, input_shape=(1, 32, 32), queries=8,
                                 rounds=0, generator=torch.Generator().manual_seed(3)))
        assert torch.equal(torch.get_rng_state(), state)
        torch.rand(5)  # disturb the global RNG between the runs
    assert torch.equal(runs[0], runs[1])
