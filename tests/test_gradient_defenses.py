"""Gradient defenses (noise, magnitude pruning, quantization) as Wire transforms, in federated and
split training, and DLG against them: naive, and adaptive (knowing the defense)."""
import pytest
import torch
from torch import nn

from attacks import DLG
from attacks.adaptive import average_repeats
from attacks.gradient_matching import read_updates
from defenses import GRADIENT_DEFENSES, GradientNoise, GradientPruning, GradientQuantization
from toolkit import data, metrics, models
from toolkit.federated import FedConfig, FederatedAveraging
from toolkit.federated.compression import QSGD, TopK
from toolkit.split import SplitConfig, SplitNN
from toolkit.federated.probe import observe_one_sample
from toolkit.wire import Wire

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (1, 32, 32)


def rows(seed=0, k=3, p=500):
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed))


# -- the transforms ----------------------------------------------------------------------------
def test_pruning_zeroes_the_smallest_fraction_of_each_row_as_topk_without_error_feedback():
    v = rows()
    out = GradientPruning(0.3)(v, kind="update")
    kept = out != 0
    assert kept.sum(1).tolist() == [350] * 3
    for r in range(3):  # every kept magnitude is at least every pruned one, and kept values are exact
        assert float(v[r].abs()[kept[r]].min()) >= float(v[r].abs()[~kept[r]].max())
    assert torch.equal(out[kept], v[kept])
    same = TopK(0.7, error_feedback=False).compress(v, torch.arange(3)).decode()
    assert torch.equal(out, same)


def test_noise_has_the_variance_asked_and_draws_from_its_generator():
    v = torch.zeros(4, 20_000)
    a = GradientNoise(1e-2, generator=torch.Generator().manual_seed(1))(v, kind="update")
    b = GradientNoise(sigma=0.1, generator=torch.Generator().manual_seed(1))(v, kind="update")
    c = GradientNoise(1e-2, generator=torch.Generator().manual_seed(2))(v, kind="update")
    assert float(a.var()) == pytest.approx(1e-2, rel=0.02)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_uniform_quantization_is_within_half_a_step_on_a_grid_of_the_levels():
    v = rows(1)
    q = GradientQuantization(levels=7)(v, kind="update")
    step = v.abs().amax(1, keepdim=True) / 7
    assert bool(((q - v).abs() <= step / 2 + 1e-6).all())
    assert bool((torch.round(q / step) - q / step).abs().max() < 1e-4)
    assert all(len(torch.unique(r)) <= 15 for r in q)


def test_stochastic_quantization_is_qsgd_decoded():
    v = rows(2)
    ours = GradientQuantization(levels=4, stochastic=True, generator=torch.Generator().manual_seed(3))(v, kind="update")
    packet = QSGD(4).compress(v, torch.arange(3), generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours, packet.decode())


@pytest.mark.parametrize("defense", [GradientPruning(0.6), GradientQuantization(5),
                                     GradientQuantization(3, stochastic=True, generator=torch.Generator().manual_seed(0))])
def test_the_preimage_holds_the_truth_and_is_as_tight_as_the_defense(defense):
    v = rows(4)
    out = defense(v, kind="update")
    for truth, seen in zip(v, out):
        low, high = defense.preimage(seen)
        assert bool(((low <= truth) & (truth <= high)).all())
        width = high - low
        if isinstance(defense, GradientPruning):  # kept entries exact
            assert bool((width[seen != 0] == 0).all()) and int((seen != 0).sum()) == 200
        elif defense.stochastic:  # within one QSGD step either way
            assert float(width.max()) <= 2 * float(truth.norm()) / defense.levels * (1 + 1e-5)
        else:  # one uniform step
            assert float(width.max()) == pytest.approx(float(truth.abs().max()) / defense.levels, rel=1e-5)


def test_other_kinds_pass_unchanged_and_bad_settings_are_refused():
    v = rows()
    for name, cls in GRADIENT_DEFENSES.items():
        d = cls(1e-2) if name == "noise" else cls(0.5) if name == "pruning" else cls(4)
        assert d(v, kind="weights") is v and d(v, kind="activations") is v
    for bad in (lambda: GradientNoise(), lambda: GradientNoise(1e-2, sigma=0.1), lambda: GradientNoise(-1.0),
                lambda: GradientPruning(1.0), lambda: GradientPruning(-0.1), lambda: GradientQuantization(0),
                lambda: GradientQuantization(128), lambda: GradientPruning(0.5, kinds=[]),
                lambda: GradientPruning(0.5, kinds=[3])):
        with pytest.raises(ValueError):
            bad()
    # one kind name is one kind (as for every Wire-transform defense), never its letters
    assert GradientPruning(0.5, kinds="update").kinds == ("update",)
    assert GradientPruning(0.5, kinds="update")(v, kind="u") is v


def test_gradients_flow_back_through_the_mask_and_straight_through_quantization():
    v = rows().requires_grad_(True)
    pruned = GradientPruning(0.5)(v, kind="gradients")
    pruned.sum().backward()
    assert torch.equal(v.grad, (pruned != 0).float())
    v.grad = None
    GradientQuantization(3)(v, kind="gradients").sum().backward()
    assert torch.equal(v.grad, torch.ones_like(v))


# -- in the protocols --------------------------------------------------------------------------
def test_fedavg_updates_cross_pruned_and_a_topk_packet_has_its_values_noised(digits):
    model = models.mlp([64, 16, 10])
    clients = data.partition(digits, 3, "iid", seed=0)
    fl = FederatedAveraging(model, clients, config=FedConfig(batch_size=64), wire=Wire([GradientPruning(0.75)]))
    fl.fit(1)
    sent = fl.wire.observed(by="server", kind="update")
    n = sum(p.numel() for p in model.parameters())
    assert len(sent) == 3 and all(int((t.tensor != 0).sum()) == round(0.25 * n) for t in sent)
    noise = GradientNoise(1e-2, generator=torch.Generator().manual_seed(0))
    fl = FederatedAveraging(models.mlp([64, 16, 10]), clients, config=FedConfig(batch_size=64),
                            wire=Wire([noise]), compressor=TopK(0.1, error_feedback=False))
    fl.fit(1)
    packet = fl.wire.observed(by="server", kind="update")[0].tensor
    assert type(packet).__name__ == "SparsePacket" and packet.values.shape == (round(0.1 * n),)
    with pytest.raises(ValueError, match="QuantizedPacket"):
        FederatedAveraging(models.mlp([64, 16, 10]), clients, wire=Wire([noise]), compressor=QSGD(4)).fit(1)


def test_split_cut_layer_gradients_cross_pruned_per_sample(digits):
    torch.manual_seed(0)
    client, server = nn.Sequential(nn.Flatten(), nn.Linear(64, 20), nn.Tanh()), nn.Sequential(nn.Linear(20, 10))
    sl = SplitNN.vanilla(client, server, digits, config=SplitConfig(batch_size=64, seed=0),
                         wire=Wire([GradientPruning(0.5)]))
    sl.fit(epochs=1)
    grads = sl.wire.observed(by="client", kind="gradients")
    assert grads and all(((t.tensor != 0).sum(1) == 10).all() for t in grads)


# -- DLG against the defenses --------------------------------------------------------------------
def victim():
    return models.init_uniform_(models.lenet(image_size=32, variant="dlg"), generator=torch.Generator().manual_seed(1))


def observe(model, ds, defense, rounds=1, lr=1.0):
    """Client 0 holds digit 0; the server sends it the same weights ``rounds`` times."""
    wire = observe_one_sample(model, ds, 0, defense=defense, lr=lr, rounds=rounds)
    return wire.observed(by="server", kind="update") + wire.observed(sender="server", kind="weights")


def dlg_psnr(ds, observed, model, **kwargs):
    """DLG cut short (10 L-BFGS steps, label from iDLG, no polish): a clean update is past 40 dB by then."""
    attack = DLG(model, input_shape=SHAPE, client_lr=1.0, labels="idlg", lbfgs_steps=10, polish_steps=0, **kwargs)
    result = attack.run(observed, generator=torch.Generator().manual_seed(0))
    return float(metrics.psnr(result.reconstruction, ds.x_train[[0]]))


def test_noise_of_variance_1e_2_takes_dlg_below_15_db(digits32):
    model = victim()
    clean = dlg_psnr(digits32, observe(model, digits32, None), model)
    noisy = dlg_psnr(digits32, observe(model, digits32, GradientNoise(1e-2, generator=torch.Generator().manual_seed(0))),
                     model)
    assert clean > 40 and noisy < 15, (clean, noisy)


def test_the_adaptive_attacker_beats_the_naive_one_against_pruning(digits32):
    model = victim()
    pruning = GradientPruning(0.5)
    observed = observe(model, digits32, pruning)
    naive = dlg_psnr(digits32, observed, model)
    adaptive = DLG(model, input_shape=SHAPE, client_lr=1.0, defense=pruning)
    assert "knows the defense GradientPruning(fraction=0.5)" in adaptive.threat_model
    adaptive = dlg_psnr(digits32, observed, model, defense=pruning)
    assert adaptive > 40 and adaptive > naive + 10, (naive, adaptive)


def test_averaging_repeated_noisy_updates_divides_the_noise():
    ds = data.load("digits", image_size=32)
    model = victim()
    noise = GradientNoise(1e-2, generator=torch.Generator().manual_seed(0))
    observed = observe(model, ds, noise, rounds=8)
    updates = read_updates(observed, model, lr=1.0, attack="test")
    (mean,) = average_repeats(updates)
    clean = read_updates(observe(model, ds, None), model, lr=1.0, attack="test")[0]
    err = [sum(float(((u.gradient[k] - clean.gradient[k]) ** 2).mean()) for k in clean.gradient)
           for u in (updates[0], mean)]
    assert err[1] < err[0] / 4, err  # 8 observations: variance / 8 (up to sampling)
    other = models.init_uniform_(models.lenet(image_size=32, variant="dlg"), generator=torch.Generator().manual_seed(2))
    elsewhere = read_updates(observe(other, ds, noise), other, lr=1.0, attack="test")
    assert len(average_repeats(updates + elsewhere)) == 2  # other weights: another update


def test_the_adaptive_settings_are_checked():
    model = victim()
    with pytest.raises(ValueError, match="preimage"):
        DLG(model, input_shape=SHAPE, client_lr=1.0, defense=GradientNoise(1e-2))
    with pytest.raises(ValueError, match="repeats"):
        DLG(model, input_shape=SHAPE, client_lr=1.0, repeats="median")
    with pytest.raises(ValueError, match="combined"):
        DLG(model, input_shape=SHAPE, client_lr=1.0, repeats="average", defense=GradientPruning(0.5))
