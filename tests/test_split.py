"""Split learning: exactness, audits, accuracy, byte accounting and bad input, per configuration."""
import copy

import pytest
import torch
from torch import nn

from toolkit import data, models
from toolkit.audit import find_rows
from toolkit.split import SplitConfig, SplitNN
from toolkit.wire import Wire

FAST = SplitConfig(lr=0.5, batch_size=32)


class CopyingTransport:
    """Delivers a copy, as a network would."""

    def deliver(self, tensor, *, sender, receiver, kind):
        return tensor.detach().clone()


def mlp4():
    torch.manual_seed(0)
    return models.mlp([64, 128, 64, 10])


def monolithic(net, ds, config, epochs):
    """The same network trained unsplit, with the same optimizer and data order."""
    opt = config.make_optimizer()(net.parameters())
    g = torch.Generator().manual_seed(config.seed)
    losses = []
    for _ in range(epochs):
        for idx in torch.randperm(len(ds.y_train), generator=g).split(config.batch_size):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(ds.x_train[idx]), ds.y_train[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


BUILDERS = {
    "vanilla": lambda net, ds, cfg, wire=None: SplitNN.vanilla(*models.cut(net, at=3), ds, config=cfg, wire=wire),
    "u_shaped": lambda net, ds, cfg, wire=None: SplitNN.u_shaped(*models.cut(net, at=(2, 5)), ds, config=cfg,
                                                                 wire=wire),
    "multi_hop": lambda net, ds, cfg, wire=None: SplitNN.multi_hop(models.cut(net, at=(2, 4, 5)), ds, config=cfg,
                                                                   wire=wire),
}


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("transport", ["in-process", "copying"])
def test_chain_configurations_equal_monolithic_training(digits, name, momentum, transport):
    cfg = SplitConfig(lr=0.05, batch_size=64, momentum=momentum, seed=3)
    net = mlp4()
    twin = copy.deepcopy(net)
    ref_losses = monolithic(twin, digits, cfg, epochs=2)
    wire = Wire(transport=CopyingTransport() if transport == "copying" else None)
    sl = BUILDERS[name](net, digits, cfg, wire)
    history = sl.fit(epochs=2)
    assert history["loss"].tolist() == pytest.approx(ref_losses, abs=1e-6)
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)


def test_vanilla_lenet_equals_monolithic(digits):
    ds = data.load("digits", image_size=28)
    ds = ds.subset(torch.arange(512))
    cfg = SplitConfig(lr=0.05, batch_size=64)
    torch.manual_seed(1)
    net = models.lenet()
    twin = copy.deepcopy(net)
    ref = monolithic(twin, ds, cfg, epochs=1)
    hist = SplitNN.vanilla(*models.cut(net, at="pool2"), ds, config=cfg).fit(1)
    assert hist["loss"].tolist() == pytest.approx(ref, abs=1e-6)
    assert all(torch.allclose(p, q, atol=1e-6, rtol=0) for p, q in zip(net.parameters(), twin.parameters()))


# -- every configuration ------------------------------------------------------------------
def vertical(ds, cfg, wire=None):
    views = data.vertical_split(ds, 2)
    encoders = [models.mlp([32, 64]) for _ in views]
    return SplitNN.vertical(encoders, nn.Sequential(nn.ReLU(), nn.Linear(128, 10)), views, config=cfg,
                            wire=wire), views


def multi_task(ds, cfg, head_parties=None, wire=None):
    heads = {"digit": nn.Sequential(nn.ReLU(), nn.Linear(128, 10)),
             "parity": nn.Sequential(nn.ReLU(), nn.Linear(128, 2))}
    return SplitNN.multi_task(models.mlp([64, 128]), heads, ds, targets={"parity": lambda y: y % 2},
                              head_parties=head_parties, config=cfg, wire=wire)


CONFIGS = {
    "vanilla": lambda ds, cfg, wire=None: BUILDERS["vanilla"](mlp4(), ds, cfg, wire),
    "u_shaped": lambda ds, cfg, wire=None: BUILDERS["u_shaped"](mlp4(), ds, cfg, wire),
    "multi_hop": lambda ds, cfg, wire=None: BUILDERS["multi_hop"](mlp4(), ds, cfg, wire),
    "vertical": lambda ds, cfg, wire=None: vertical(ds, cfg, wire)[0],
    "multi_task": lambda ds, cfg, wire=None: multi_task(ds, cfg, wire=wire),
}


@pytest.fixture(scope="module")
def trained(digits):
    """Each configuration trained once for 10 epochs on digits (about 0.3 s each)."""
    torch.manual_seed(0)
    runs = {}
    for name, build in CONFIGS.items():
        sl = build(digits, FAST)
        sl.fit(epochs=10)
        runs[name] = (sl, sl.evaluate())
    return runs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_configuration_learns_digits_to_95_percent(trained, name):
    _, result = trained[name]
    assert result["accuracy"] >= 0.95, result
    if name == "multi_task":
        assert result["accuracy_digit"] >= 0.95 and result["accuracy_parity"] >= 0.95


@pytest.mark.parametrize("name", list(CONFIGS))
def test_no_raw_input_crosses_the_wire(trained, digits, name):
    sl, _ = trained[name]
    transcript = sl.wire.observed()
    assert len(transcript) > 0
    assert find_rows(transcript, digits.x_train) == []
    assert find_rows(transcript, digits.x_test) == []


def test_a_client_part_without_parameters_is_flagged(digits):
    with pytest.warns(UserWarning, match="no trainable parameters: it sends its raw inputs"):
        SplitNN.vanilla(nn.Flatten(), nn.Linear(64, 10), digits)


def test_the_audit_catches_a_raw_batch(trained, digits):
    sl, _ = trained["vanilla"]
    leaky = copy.deepcopy(sl.wire)
    leaky.send(digits.x_train[5:9], sender="client", receiver="server", kind="activations")
    assert len(find_rows(leaky.observed(), digits.x_train)) == 1


def test_u_shaped_labels_never_leave_the_client(trained, digits):
    sl, _ = trained["u_shaped"]
    transcript = sl.wire.observed()
    assert {t.kind for t in transcript} == {"activations", "gradients"}
    assert all(t.tensor.is_floating_point() for t in transcript)
    onehot = nn.functional.one_hot(torch.arange(10)).float()
    assert find_rows(transcript, onehot) == []
    # whereas vanilla sends them
    assert {t.kind for t in trained["vanilla"][0].wire.observed(by="server")} == {"activations", "labels"}


def test_vertical_clients_features_reach_no_other_party(digits):
    sl, views = vertical(digits, FAST)
    sl.fit(epochs=1)
    sl.evaluate()
    transcript = sl.wire.observed()
    for k, view in enumerate(views):
        assert find_rows(transcript, view.x_train) == [] and find_rows(transcript, view.x_test) == []
        received = sl.wire.observed(by=f"client:{k}")
        assert {t.kind for t in received} == {"gradients"} and {t.sender for t in received} == {"server"}
    assert {t.kind for t in transcript} == {"activations", "gradients"}  # labels stay at the server


@pytest.mark.parametrize("name", list(CONFIGS))
def test_summary_bytes_equal_the_transcript(trained, name):
    wire = trained[name][0].wire
    total = sum(t.nbytes for t in wire.observed())
    summary = wire.summary()
    assert summary["bytes_up"].sum() == summary["bytes_down"].sum() == wire.total_bytes == total
    ledger = wire.ledger()
    for (s, r, k), group in ledger.groupby(["sender", "receiver", "kind"]):
        assert group["bytes"].sum() == sum(t.nbytes for t in wire.observed(by=r, sender=s, kind=k))


def test_vanilla_transcript_shape_per_step(digits):
    sl = CONFIGS["vanilla"](digits, FAST)
    history = sl.fit(epochs=1)
    steps = len(history)
    assert steps == -(-len(digits.y_train) // 32)
    assert len(sl.wire.observed(by="server", kind="activations")) == steps
    assert len(sl.wire.observed(by="server", kind="labels")) == steps
    grads = sl.wire.observed(by="client", kind="gradients")
    acts = sl.wire.observed(by="server", kind="activations")
    assert len(grads) == steps and all(g.tensor.shape == a.tensor.shape for g, a in zip(grads, acts))
    assert list(history.columns) == ["epoch", "step", "loss", "accuracy", "bytes"]
    assert history["bytes"].is_monotonic_increasing and history["bytes"].iloc[-1] == sl.wire.total_bytes
    sl.evaluate()
    assert len(sl.wire.observed(by="server", phase="eval")) == 2  # test activations and test labels


def test_multi_task_heads_on_one_party_receive_activations_once(digits):
    sl = multi_task(digits, FAST, head_parties={"digit": "server", "parity": "server"})
    steps = len(sl.fit(epochs=1))
    assert len(sl.wire.observed(by="server", kind="activations")) == steps
    assert len(sl.wire.observed(by="client", kind="gradients")) == steps
    apart = multi_task(digits, FAST)
    apart.fit(epochs=1)
    assert len(apart.wire.observed(kind="activations")) == 2 * steps


def test_same_seed_same_history(digits):
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(CONFIGS["vertical"](digits, SplitConfig(lr=0.5, batch_size=32, seed=5)).fit(epochs=2))
    assert runs[0].equals(runs[1])
    torch.manual_seed(0)
    other = CONFIGS["vertical"](digits, SplitConfig(lr=0.5, batch_size=32, seed=6)).fit(epochs=2)
    assert not other["loss"].equals(runs[0]["loss"])


def test_recording_off_counts_the_same_bytes(digits):
    on = CONFIGS["vanilla"](digits, FAST)
    off = CONFIGS["vanilla"](digits, SplitConfig(lr=0.5, batch_size=32, record=False))
    h_on, h_off = on.fit(1), off.fit(1)
    assert off.wire.observed() == [] and off.wire.total_bytes == on.wire.total_bytes > 0
    assert h_on["loss"].equals(h_off["loss"])


def test_eval_each_epoch_adds_test_columns(digits):
    history = CONFIGS["vanilla"](digits, FAST).fit(epochs=2, eval_each_epoch=True)
    marked = history.dropna(subset=["test_accuracy"])
    assert list(marked["epoch"]) == [0, 1] and (marked["test_accuracy"] > 0.5).all()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_copying_transport_gives_the_same_transfers_and_numbers(digits, name):
    runs = []
    for transport in (None, CopyingTransport()):
        torch.manual_seed(0)
        wire = Wire(transport=transport)
        sl = CONFIGS[name](digits, FAST, wire=wire)
        runs.append((sl.fit(epochs=1), wire.observed()))
    (h1, t1), (h2, t2) = runs
    assert h1["loss"].tolist() == pytest.approx(h2["loss"].tolist(), abs=1e-6)
    assert [(t.step, t.sender, t.receiver, t.kind) for t in t1] != [] and len(t1) == len(t2)
    assert sorted((t.step, t.sender, t.receiver, t.kind) for t in t1) == \
        sorted((t.step, t.sender, t.receiver, t.kind) for t in t2)
    by_key = {(t.step, t.sender, t.receiver, t.kind): t.tensor for t in t2}
    assert all(torch.allclose(t.tensor.float(), by_key[(t.step, t.sender, t.receiver, t.kind)].float(), atol=1e-5)
               for t in t1)


def test_fit_calls_on_step_with_the_history_so_far_and_trains_as_without_it():
    import pandas as pd
    from toolkit import data, models, seed_everything
    from toolkit.split import SplitConfig, SplitNN

    ds = data.load("digits").subset(range(200))

    def run(**kwargs):
        seed_everything(0)
        client, server = models.cut(models.mlp([64, 16, 10]), at=2)
        return SplitNN.vanilla(client, server, ds, config=SplitConfig(batch_size=50, lr=0.1)), kwargs

    seen = []
    sl, kw = run()
    plain = sl.fit(epochs=2)
    sl, kw = run()
    watched = sl.fit(epochs=2, on_step=lambda h: seen.append(h.copy()), every=3)
    pd.testing.assert_frame_equal(plain, watched)
    assert [len(h) for h in seen] == [3, 6]  # 4 steps per epoch: steps 3 and 6
    pd.testing.assert_frame_equal(seen[-1], watched.iloc[:6])
    seen.clear()
    sl, kw = run()
    sl.fit(steps=5, on_step=lambda h: seen.append(len(h)))
    assert seen == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="on_step must be a callable"):
        sl.fit(epochs=1, on_step="draw")
    with pytest.raises(ValueError, match="every must be a positive int"):
        sl.fit(epochs=1, on_step=print, every=0)
