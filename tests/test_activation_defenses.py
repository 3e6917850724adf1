"""Activation defenses on the Wire (defenses.activations): split training with each transform
equals the unsplit network with the same operation inserted at the cut, backward included; same
seed, same numbers; the noise and masks have the stated statistics; other kinds pass untouched;
the defense applies at inference too; bad input is refused; and against the inverse network, noise
and dropout at high strength lower the attack's SSIM, and an attacker who knows the noise does
better than one who does not."""
import copy

import pytest
import torch
from torch import nn

from attacks.model_inversion import InverseNetwork
from defenses import ACTIVATION_DEFENSES, Clip, CutDropout, GaussianNoise, LaplaceNoise, Quantize
from toolkit import metrics
from toolkit.split import SplitConfig, SplitNN
from toolkit.wire import Packet, Transfer, Wire

from test_split import monolithic  # noqa: E402  (tests/ is on sys.path): the unsplit reference loop

CFG = SplitConfig(lr=0.05, batch_size=64, momentum=0.9, seed=3)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


TRANSFORMS = {  # strengths at which each one changes the tanh activations of ``parts`` noticeably
    "gaussian": lambda seed, **kw: GaussianNoise(0.3, generator=seeded(seed), **kw),
    "laplace": lambda seed, **kw: LaplaceNoise(0.2, generator=seeded(seed), **kw),
    "dropout": lambda seed, **kw: CutDropout(0.3, generator=seeded(seed), **kw),
    "dropout_unscaled": lambda seed, **kw: CutDropout(0.5, rescale=False, generator=seeded(seed), **kw),
    "quantize_per_tensor": lambda seed, **kw: Quantize(2, **kw),
    "quantize_range": lambda seed, **kw: Quantize(3, value_range=(-0.5, 0.5), **kw),
    "clip": lambda seed, **kw: Clip(1.0, **kw),
}


class AtCut(nn.Module):
    """A wire transform inserted at the cut of an unsplit network: applied to the activations
    going forward, and (through a hook) to the gradient coming back when it acts on "gradients"."""

    def __init__(self, transform):
        super().__init__()
        self.transform = transform

    def forward(self, t):
        t = self.transform(t, kind="activations")
        if t.requires_grad and "gradients" in self.transform.kinds:
            t = t.view_as(t)
            t.register_hook(lambda g: self.transform(g, kind="gradients"))
        return t


def parts():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh()), nn.Sequential(nn.Linear(32, 10))


def split_and_unsplit(digits, make, **kw):
    """(split losses, unsplit losses, split parameters, unsplit parameters, split run)."""
    client, server = parts()
    twin_client, twin_server = copy.deepcopy(client), copy.deepcopy(server)
    ref = monolithic(nn.Sequential(twin_client, AtCut(make(7, **kw)), twin_server), digits, CFG, epochs=1)
    sl = SplitNN.vanilla(client, server, digits, config=CFG, wire=Wire([make(7, **kw)]))
    losses = sl.fit(epochs=1)["loss"].tolist()
    return losses, ref, [*client.parameters(), *server.parameters()], [
        *twin_client.parameters(), *twin_server.parameters()], sl


@pytest.fixture(scope="module")
def clean_losses(digits):
    client, server = parts()
    return monolithic(nn.Sequential(client, server), digits, CFG, epochs=1)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_split_training_with_the_transform_equals_the_network_with_it_inserted(digits, clean_losses, name):
    losses, ref, mine, theirs, sl = split_and_unsplit(digits, TRANSFORMS[name])
    assert losses == pytest.approx(ref, abs=1e-6)
    assert all(torch.allclose(p, q, atol=1e-6, rtol=0) for p, q in zip(mine, theirs))
    assert max(abs(a - b) for a, b in zip(losses, clean_losses)) > 1e-3  # the transform changed training


@pytest.mark.parametrize("name", ["gaussian", "dropout"])
def test_on_gradients_too_it_perturbs_what_the_server_sends_back(digits, clean_losses, name):
    """kinds=("activations", "gradients"): the noise (or mask) on the gradient is what the client
    backpropagates, as in the unsplit network with the same hook at the cut."""
    losses, ref, mine, theirs, sl = split_and_unsplit(digits, TRANSFORMS[name], kinds=("activations", "gradients"))
    assert losses == pytest.approx(ref, abs=1e-6)
    assert all(torch.allclose(p, q, atol=1e-6, rtol=0) for p, q in zip(mine, theirs))
    only_activations = split_and_unsplit(digits, TRANSFORMS[name])[2]
    assert not all(torch.allclose(p, q, atol=1e-4) for p, q in zip(mine, only_activations))


@pytest.mark.parametrize("name", ["gaussian", "laplace", "dropout"])
def test_same_seed_same_numbers_and_fresh_draws_per_send(name):
    z = torch.rand(64, 32) + 0.5
    a, b, c = TRANSFORMS[name](1), TRANSFORMS[name](1), TRANSFORMS[name](2)
    first = a(z, kind="activations")
    assert torch.equal(first, b(z, kind="activations"))
    assert not torch.equal(first, c(z, kind="activations"))
    assert not torch.equal(first, a(z, kind="activations"))  # the next send draws anew


def test_gaussian_noise_has_mean_zero_and_std_sigma():
    n = GaussianNoise(0.7, generator=seeded(0))(torch.zeros(200_000), kind="activations")
    # standard errors: 0.7 / sqrt(n) = 0.0016 for the mean, about 0.0011 for the std
    assert abs(n.mean().item()) < 0.01 and n.std().item() == pytest.approx(0.7, rel=0.01)


def test_laplace_noise_has_the_laplace_spread_and_tails():
    n = LaplaceNoise(0.5, generator=seeded(0))(torch.zeros(200_000), kind="activations")
    assert abs(n.mean().item()) < 0.01
    assert n.abs().mean().item() == pytest.approx(0.5, rel=0.01)  # E|n| = b
    assert n.std().item() == pytest.approx(2 ** 0.5 * 0.5, rel=0.02)  # sqrt(2) b
    kurtosis = ((n - n.mean()) ** 4).mean() / n.var() ** 2
    assert 5.0 < kurtosis.item() < 7.0  # Laplace: 6 (a Gaussian: 3)


@pytest.mark.parametrize("rescale", [True, False])
def test_dropout_zeroes_the_rate_and_rescales_the_rest(rescale):
    z = torch.rand(400, 500) + 0.5  # no zeros of its own
    out = CutDropout(0.8, rescale=rescale, generator=seeded(0))(z, kind="activations")
    dropped = out == 0
    assert dropped.float().mean().item() == pytest.approx(0.8, abs=0.005)  # standard error 0.0009
    factor = 5.0 if rescale else 1.0
    assert torch.allclose(out[~dropped], z[~dropped] * factor)
    if rescale:
        assert out.mean().item() == pytest.approx(z.mean().item(), rel=0.01)


def test_quantize_uses_at_most_2_to_the_bits_levels_within_half_a_step():
    z = torch.randn(1000, 16)
    low, high = z.min().item(), z.max().item()
    q = Quantize(3)(z, kind="activations")
    assert len(torch.unique(q)) <= 8
    assert q.min().item() == pytest.approx(low) and q.max().item() == pytest.approx(high)
    assert (q - z).abs().max().item() <= (high - low) / 7 / 2 + 1e-6
    fixed = Quantize(1, value_range=(0.0, 1.0))(torch.tensor([-3.0, 0.2, 0.6, 4.0]), kind="activations")
    assert fixed.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert torch.equal(Quantize(4)(torch.full((3, 2), 2.5), kind="activations"), torch.full((3, 2), 2.5))


def test_quantize_passes_the_gradient_straight_through():
    z = torch.randn(8, 4, requires_grad=True)
    upstream = torch.randn(8, 4)
    q = Quantize(2, value_range=(-0.5, 0.5))(z, kind="activations")  # most entries clamped, all rounded
    (q * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)


def test_clip_bounds_every_row_and_keeps_short_rows_and_directions():
    z = torch.randn(100, 3, 4, 4) * torch.linspace(0.01, 1.0, 100).view(-1, 1, 1, 1)
    out = Clip(2.0)(z, kind="activations")
    before, after = z.flatten(1).norm(dim=1), out.flatten(1).norm(dim=1)
    assert (after <= 2.0 + 1e-5).all() and (before > 2.0).any() and (before < 2.0).any()
    short = before <= 2.0
    assert torch.equal(out[short], z[short])
    assert after[~short] == pytest.approx(torch.full((int((~short).sum()),), 2.0), abs=1e-5)
    cos = nn.functional.cosine_similarity(out.flatten(1), z.flatten(1))
    assert cos.min().item() == pytest.approx(1.0, abs=1e-6)
    # A 1-D tensor: one party's row on "update", a batch of one-entry samples on "activations" (dim 0 is
    # the batch of what the split engine sends; it was one row before Clip and the Gaussian mechanism
    # shared defenses.transforms.clip_rows)
    assert Clip(1.0, kinds="update")(torch.tensor([3.0, 4.0]), kind="update").tolist() == pytest.approx([0.6, 0.8])
    assert Clip(1.0)(torch.tensor([3.0, 0.5]), kind="activations").tolist() == pytest.approx([1.0, 0.5])
    assert Clip(1.0)(torch.zeros(0, 4), kind="activations").shape == (0, 4)  # an empty batch passes


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_other_kinds_pass_untouched_without_drawing(name):
    t = TRANSFORMS[name](0)
    state = t.generator.get_state() if hasattr(t, "generator") else None
    for kind in ("gradients", "labels", "weights", "update"):
        z = torch.randn(16, 8)
        assert t(z, kind=kind) is z
    if state is not None:
        assert torch.equal(t.generator.get_state(), state)
    chosen = TRANSFORMS[name](0, kinds=("activations", "update"))
    z = torch.randn(16, 8) * 3
    assert not torch.equal(chosen(z, kind="update"), z) and chosen(z, kind="weights") is z


def test_the_defense_applies_to_what_crosses_at_inference(digits):
    """Test-time activations (wire.during("eval"), as SplitNN.evaluate sends them) are defended
    too: they are what a model-inversion attack reads."""
    client, server = parts()
    sl = SplitNN.vanilla(client, server, digits, config=CFG, wire=Wire([GaussianNoise(0.5, generator=seeded(0))]))
    sl.evaluate()
    (sent,) = sl.wire.observed(by="server", kind="activations", phase="eval")
    with torch.no_grad():
        clean = client(digits.x_test)
    assert (sent.tensor - clean).std().item() == pytest.approx(0.5, rel=0.03)  # 11,520 entries
    drop = SplitNN.vanilla(client, server, digits, config=CFG, wire=Wire([CutDropout(0.6, generator=seeded(0))]))
    drop.evaluate()
    (sent,) = drop.wire.observed(by="server", kind="activations", phase="eval")
    assert (sent.tensor == 0).float().mean().item() == pytest.approx(0.6, abs=0.02)


def test_bad_input_is_refused_with_the_name_of_the_problem():
    for call, match in [(lambda: GaussianNoise(-0.1), "sigma"), (lambda: GaussianNoise(float("nan")), "sigma"),
                        (lambda: LaplaceNoise(-1), "scale"), (lambda: CutDropout(-0.1), "rate"),
                        (lambda: CutDropout(1.0), "rate"), (lambda: CutDropout(1.5), "rate"),
                        (lambda: CutDropout(0.5, rescale=1), "rescale"), (lambda: Quantize(0), "bits"),
                        (lambda: Quantize(25), "bits"), (lambda: Quantize(2.5), "bits"),
                        (lambda: Quantize(4, value_range=(1.0, 0.0)), "low < high"),
                        (lambda: Quantize(4, value_range=(0.0,)), "value_range"), (lambda: Clip(0), "max_norm"),
                        (lambda: GaussianNoise(1.0, kinds=""), "kinds"), (lambda: Clip(1.0, kinds=[]), "kinds"),
                        (lambda: Clip(1.0, kinds=3), "kinds")]:
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(TypeError, match="generator"):
        GaussianNoise(1.0, generator=0)
    with pytest.raises(ValueError, match="floating-point"):
        GaussianNoise(1.0)(torch.arange(4), kind="activations")
    with pytest.raises(ValueError, match="Packet"):
        GaussianNoise(1.0, kinds="update")(Packet(), kind="update")
    assert set(ACTIVATION_DEFENSES) == {"gaussian", "laplace", "dropout", "quantize", "clip"}


# -- against the inverse network (digits 8x8, a conv client cut at its ReLU) -----------------------
def train(digits, transform):
    torch.manual_seed(0)
    client = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())  # (B, 8, 8, 8) cut-layer activations
    server = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    sl = SplitNN.vanilla(client, server, digits, wire=Wire([transform] if transform else []),
                         config=SplitConfig(lr=0.05, momentum=0.9, batch_size=32, record=False))
    sl.fit(epochs=4)
    sl.wire.recording = True
    accuracy = sl.evaluate()["accuracy"]
    return client, sl.wire.observed(by="server", kind="activations", phase="eval"), accuracy


def attack(digits, client, observed, defense=None):
    """SSIM and MSE of the inverse network on the test images; trained on ``defense(client(aux))``
    (the adaptive attacker: it knows the defense, its parameters, not its draws) or on clean
    activations (``defense=None``, the naive attacker)."""
    query = client if defense is None else (lambda x: defense(client(x), kind="activations"))
    result = InverseNetwork(query, aux=digits.x_train[:800], input_shape=(1, 8, 8), epochs=10).run(
        observed, generator=seeded(0))
    scores = metrics.evaluate(result, digits.x_test)
    return scores["ssim"], scores["mse"]


@pytest.fixture(scope="module")
def victims(digits):
    out = {}
    for name, make in {"none": lambda: None, "noise": lambda: GaussianNoise(0.5, generator=seeded(1)),
                       "dropout": lambda: CutDropout(0.8, generator=seeded(1))}.items():
        out[name] = train(digits, make())
    return out


def test_noise_and_dropout_at_high_strength_lower_the_attack_ssim(digits, victims):
    """At strengths where the network still learns (measured: accuracy 0.94 without defense, 0.73
    under noise sigma 0.5, 0.65 under dropout 0.8), the adaptive attack loses SSIM."""
    assert victims["none"][2] > 0.9 and victims["noise"][2] > 0.5 and victims["dropout"][2] > 0.5
    clean_ssim, _ = attack(digits, *victims["none"][:2])
    noise_ssim, _ = attack(digits, *victims["noise"][:2], GaussianNoise(0.5, generator=seeded(5)))
    drop_ssim, _ = attack(digits, *victims["dropout"][:2], CutDropout(0.8, generator=seeded(5)))
    assert clean_ssim > 0.9  # measured 0.960; noise 0.868, dropout 0.657
    assert noise_ssim < clean_ssim - 0.05 and drop_ssim < clean_ssim - 0.2


def test_the_attacker_who_knows_the_noise_does_better_than_the_naive_one(digits, victims):
    """Measured: SSIM 0.868 against 0.447, MSE 0.016 against 0.106."""
    client, observed, _ = victims["noise"]
    adaptive = attack(digits, client, observed, GaussianNoise(0.5, generator=seeded(5)))
    naive = attack(digits, client, observed)
    assert adaptive[0] > naive[0] + 0.2 and adaptive[1] < naive[1] / 2


def test_a_transcript_is_what_the_attack_reads():
    """The attacks read Transfers; a defended send records the defended tensor, not the clean one."""
    wire = Wire([CutDropout(0.5, generator=seeded(0))])
    z = torch.rand(4, 6) + 0.1
    wire.send(z, sender="client", receiver="server", kind="activations")
    (tr,) = wire.observed(by="server")
    assert isinstance(tr, Transfer) and (tr.tensor == 0).any() and not (z == 0).any()
