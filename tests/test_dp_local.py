"""The local Gaussian mechanism on the Wire (defenses.dp_local): it clips rows as Clip does, adds
noise of the documented std from the caller's generator, backpropagates like autograd on the same
operations, counts releases per sample (activations) or per client row (updates), spends a budget
as accounted, and refuses bad settings."""
import math

import pytest
import torch
import torch.nn.functional as F

from defenses.activations import Clip
from defenses.dp_local import GaussianMechanism
from defenses.transforms import clip_rows
from toolkit import models
from toolkit.accounting import epsilon as accounted
from toolkit.federated import FedConfig, FederatedAveraging
from toolkit.split import SplitConfig, SplitNN
from toolkit.wire import Wire

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # RDP's note that its best order sits at an end of its grid: expected, not a finding
              pytest.mark.filterwarnings("ignore:Optimal order is the")]


def mlp(seed=0):
    torch.manual_seed(seed)
    return models.mlp([64, 32, 10])


def test_mechanism_rows_are_clipped_to_max_norm_before_noise():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(200, 3, 4, generator=g) * torch.linspace(0.01, 3, 200).view(-1, 1, 1)
    out = GaussianMechanism(2.0, 0.0, generator=g)(t, kind="activations")
    norms, before = out.flatten(1).norm(dim=1), t.flatten(1).norm(dim=1)
    assert (norms <= 2.0 + 1e-5).all()
    inside = before <= 2.0
    assert 0 < int(inside.sum()) < 200
    assert torch.equal(out[inside], t[inside])  # rows inside the ball pass unchanged
    torch.testing.assert_close(norms[~inside], torch.full_like(norms[~inside], 2.0))
    cos = F.cosine_similarity(out[~inside].flatten(1), t[~inside].flatten(1))
    torch.testing.assert_close(cos, torch.ones_like(cos))  # same direction


def test_mechanism_noise_has_the_documented_std_and_no_bias():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(500, 400, generator=g) * 0.01  # rows well inside the ball: clipping does nothing
    out = GaussianMechanism(1.5, 0.8, generator=g)(t, kind="activations")
    noise = out - t
    # 200,000 draws: the sample std is within 0.5 % of 1.2 with overwhelming probability, the mean within 0.01
    assert noise.std().item() == pytest.approx(0.8 * 1.5, rel=0.02)
    assert abs(noise.mean().item()) < 0.01
    assert abs(torch.corrcoef(torch.stack([noise[:, 0], noise[:, 1]]))[0, 1].item()) < 0.15  # independent entries


def test_gradient_flows_through_the_clip_and_the_noise_like_autograd_on_the_same_operations():
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(6, 5, generator=g) * torch.tensor([0.1, 0.2, 3.0, 4.0, 0.3, 5.0]).view(-1, 1)).requires_grad_()
    v = torch.randn(6, 5, generator=g)  # an upstream gradient
    out = GaussianMechanism(1.0, 0.7, generator=torch.Generator().manual_seed(3))(x, kind="activations")
    (grad,) = torch.autograd.grad(out, x, v)
    expected = torch.empty_like(v)  # the analytic vector-Jacobian product of c x / max(c, |x|)
    for i, (row, vi) in enumerate(zip(x.detach(), v)):
        n = row.norm()
        if n <= 1.0:
            expected[i] = vi
        else:
            u = row / n
            expected[i] = (vi - u * (u @ vi)) / n
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5)
    (plain,) = torch.autograd.grad(clip_rows(x, 1.0, kind="activations"), x, v)  # the noise adds a constant: same gradient
    torch.testing.assert_close(grad, plain)


def test_mechanism_in_a_split_run_counts_releases_per_sample(digits):
    n = len(digits.y_train)
    mech = GaussianMechanism(1.0, 2.0, generator=torch.Generator().manual_seed(0), population=n)
    client, server = models.cut(mlp(4), at=3)
    sl = SplitNN.vanilla(client, server, digits, config=SplitConfig(lr=0.1, momentum=0.9), wire=Wire([mech]))
    history = sl.fit(2)
    assert mech.rows == 2 * n and mech.sends == 2 * math.ceil(n / 64) and mech.releases == 2
    ends = history.groupby("epoch").tail(1)  # the history reports the budget at the end of each epoch
    assert ends["epsilon_rdp"].tolist() == [accounted(noise_multiplier=2.0, sample_rate=1.0, steps=k, delta=1e-5)
                                            for k in (1, 2)]
    assert ends["delta"].tolist() == [1e-5, 1e-5] and history["epsilon_rdp"].isna().sum() == len(history) - 2
    assert mech.epsilon() == accounted(noise_multiplier=2.0, sample_rate=1.0, steps=2, delta=1e-5)
    report = mech.report()
    assert report["releases"] == 2 and report["delta"] == 1e-5 and 0 < report["epsilon_prv"] <= report["epsilon_rdp"]
    seen = torch.cat([t.tensor for t in sl.wire.observed(by="server", kind="activations")])
    clean = torch.cat([client(digits.x_train[sl.batches[s]]) for s in sorted(sl.batches)[-2:]]).detach()
    assert (seen[-len(clean):] - clean).std() > 1.0  # the server sees noise of std 2.0 (plus drift) ...
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in client.parameters())  # ... and the client trains
    sl.evaluate()  # test activations are releases too (of other samples): counted, conservatively
    assert mech.rows == 2 * n + len(digits.y_test) and mech.releases == 3


def test_mechanism_on_federated_updates_clips_each_client_row(iid10):
    mech = GaussianMechanism(0.05, 0.0, generator=torch.Generator().manual_seed(0), kinds=("update",))
    fl = FederatedAveraging(mlp(), iid10, config=FedConfig(seed=0), wire=Wire([mech]))
    fl.fit(2)
    updates = fl.wire.observed(by="server", kind="update")
    assert len(updates) == 20 and mech.rows == 20 and mech.releases == 2  # a client releases once per round
    assert max(float(u.tensor.norm()) for u in updates) <= 0.05 + 1e-6
    weights = fl.wire.observed(kind="weights")
    assert all(torch.equal(w.tensor, weights[0].tensor) for w in weights[:10])  # kind "weights" untouched
    noisy = GaussianMechanism(0.05, 1.0, generator=torch.Generator().manual_seed(0), kinds=("update",))
    fl = FederatedAveraging(mlp(), iid10, config=FedConfig(seed=0), wire=Wire([noisy]))
    history = fl.fit(2)
    assert torch.isfinite(torch.tensor(history["accuracy"].tolist())).all()
    assert noisy.epsilon() == accounted(noise_multiplier=1.0, sample_rate=1.0, steps=2, delta=1e-5)
    assert history["epsilon_rdp"].tolist() == [accounted(noise_multiplier=1.0, sample_rate=1.0, steps=k, delta=1e-5)
                                               for k in (1, 2)]  # every round's row carries the budget


def test_mechanism_from_a_budget_spends_it():
    mech = GaussianMechanism.for_budget(epsilon=4.0, delta=1e-5, releases=10, max_norm=1.0,
                                        generator=torch.Generator().manual_seed(0))
    assert mech.epsilon(10) == pytest.approx(4.0, abs=0.02) and mech.epsilon(10) <= 4.0
    assert mech.epsilon() == 0.0 and mech.epsilon(20) > 4.0
    with pytest.raises(ValueError, match="cannot be reached"):
        GaussianMechanism.for_budget(epsilon=1e-9, delta=1e-5, releases=10_000, max_norm=1.0,
                                     generator=torch.Generator())


@pytest.mark.parametrize("build, error, match", [
    (lambda g: GaussianMechanism(1.0, -1.0, generator=g), ValueError, "noise_multiplier"),
    (lambda g: GaussianMechanism(0.0, 1.0, generator=g), ValueError, "max_norm"),
    (lambda g: GaussianMechanism(1.0, 1.0, generator=None), TypeError, "generator"),
    (lambda g: GaussianMechanism(1.0, 1.0, generator=g, kinds=""), ValueError, "kinds"),
    (lambda g: GaussianMechanism(1.0, 1.0, generator=g, kinds=[]), ValueError, "kinds"),
    (lambda g: GaussianMechanism(1.0, 1.0, generator=g, population=0), ValueError, "population"),
])
def test_mechanism_refuses_bad_settings(build, error, match):
    with pytest.raises(error, match=match):
        build(torch.Generator())


def test_prv_that_cannot_compute_a_tiny_noise_budget_reports_nan_and_rdp_still_bounds_it():
    mech = GaussianMechanism(1.0, 0.02, generator=torch.Generator())
    with pytest.warns(RuntimeWarning, match="PRV accountant cannot compute"):
        report = mech.report(1)
    assert math.isnan(report["epsilon_prv"]) and 1000 < report["epsilon_rdp"] < math.inf


def test_mechanism_refuses_a_compressed_packet_and_integer_tensors_and_passes_other_kinds():
    """The shared Wire-transform base's checks (defenses.transforms.KindTransform): a Packet or an
    integer tensor on a kind it acts on is refused (ValueError, the project's bad-input error; it
    was a TypeError of the mechanism's own before the base), other kinds pass, nothing is counted."""
    from dataclasses import dataclass

    from toolkit.wire import Packet

    @dataclass
    class Sparse(Packet):
        values: torch.Tensor

    mech = GaussianMechanism(1.0, 1.0, generator=torch.Generator(), kinds=("update",))
    with pytest.raises(ValueError, match="drop the compressor"):
        mech(Sparse(torch.ones(2, 3)), kind="update")
    with pytest.raises(ValueError, match="floating-point"):
        mech(torch.ones(2, 3, dtype=torch.int64), kind="update")
    with pytest.raises(ValueError, match="0-d"):
        mech(torch.tensor(2.0), kind="update")
    packet = Sparse(torch.ones(2, 3))
    assert mech(packet, kind="weights") is packet and mech.sends == 0 and mech.rows == 0


def test_a_kind_given_as_one_string_is_one_kind():
    """As for every Wire-transform defense (the base's check_kinds): "update" is the kind, not its letters."""
    mech = GaussianMechanism(1.0, 0.0, generator=torch.Generator(), kinds="update")
    assert mech.kinds == ("update",)
    t = torch.full((2, 4), 3.0)
    assert mech(t, kind="activations") is t and mech(t, kind="u") is t
    assert mech(t, kind="update").norm(dim=1).tolist() == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize("shape", [(40, 3, 5), (40, 6), (40,), (7,)])
@pytest.mark.parametrize("kind", ["activations", "gradients", "update", "weights"])
def test_mechanism_clips_exactly_as_clip_and_counts_the_rows_it_clipped(shape, kind):
    """One clipping for both: with noise 0 the mechanism's output is Clip's, bit for bit; with
    noise it is Clip's plus the generator's draw. A 1-D tensor is that many samples on the
    batch-first kinds (activations, gradients) and one party's row on the others."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4)) * 2
    clip = Clip(1.0, kinds=kind)(x, kind=kind)
    quiet = GaussianMechanism(1.0, 0.0, generator=torch.Generator(), kinds=kind)
    assert torch.equal(quiet(x, kind=kind), clip)
    one_row = len(shape) == 1 and kind in ("update", "weights")
    assert quiet.rows == (1 if one_row else shape[0]) and quiet.sends == 1
    norms = clip.reshape(1, -1).norm(dim=1) if one_row else clip.reshape(shape[0], -1).norm(dim=1)
    assert (norms <= 1.0 + 1e-6).all() and (norms > 1.0 - 1e-6).any()
    noisy = GaussianMechanism(1.0, 0.5, generator=torch.Generator().manual_seed(9), kinds=kind)
    draw = torch.randn(shape, generator=torch.Generator().manual_seed(9)) * 0.5
    assert torch.equal(noisy(x, kind=kind), clip + draw)
