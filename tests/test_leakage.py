import pandas as pd
import pytest
import torch
from torch import nn

from toolkit import metrics, models
from toolkit.leakage import leakage_profile


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))


def test_profile_dcor_is_the_distance_correlation_of_each_layer_output():
    net, x = _net(), torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    frame = leakage_profile(net, x)
    assert list(frame["layer"]) == ["0", "1", "2"] and list(frame["index"]) == [1, 2, 3]
    assert list(frame["dim"]) == [12, 12, 3] and (frame["n"] == 40).all()
    with torch.no_grad():
        outs = [net[0](x)]
        outs += [net[1](outs[0])]
        outs += [net[2](outs[1])]
    for row, z in zip(frame.itertuples(), outs):
        assert row.dcor == pytest.approx(float(metrics.distance_correlation(x, z)), rel=1e-12)
        u = float(metrics.u_distance_correlation_sqr(x, z))
        assert row.dcor_unbiased == pytest.approx(max(u, 0.0) ** 0.5, rel=1e-12)
    assert frame.loc[0, "dcor"] > 0.9  # an injective linear map of x keeps nearly all of it


def test_profile_of_a_zoo_model_uses_its_layer_names_and_the_first_n_samples():
    net = models.lenet()
    x = torch.rand(30, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    frame = leakage_profile(net, x, n=12)
    assert list(frame["layer"]) == models.layer_table(net, (1, 28, 28))["name"].tolist()
    assert (frame["n"] == 12).all()
    with torch.no_grad():
        z = net[:3](x[:12])
    assert frame.loc[2, "dcor"] == pytest.approx(float(metrics.distance_correlation(x[:12], z)), rel=1e-12)
    # the bias correction matters where n is small against the dimension
    assert (frame["dcor_unbiased"] < frame["dcor"]).all()


def test_profile_applies_the_transform_to_each_output_and_leaves_the_model_as_it_was():
    net, x = _net(), torch.randn(30, 6, generator=torch.Generator().manual_seed(2))
    net.train()
    seen = []

    def noise(t, *, kind):
        assert kind == "activations"
        seen.append(t.shape)
        return t + 100.0 * torch.randn(t.shape, generator=torch.Generator().manual_seed(len(seen)))

    clean, noisy = leakage_profile(net, x), leakage_profile(net, x, transform=noise)
    assert seen == [torch.Size([30, 12]), torch.Size([30, 12]), torch.Size([30, 3])]
    assert (noisy["dcor"] < clean["dcor"]).all()  # noise 100x the signal hides most of it
    with torch.no_grad():  # the transform's output is what is measured; the next layer gets the clean one
        h0 = net[0](x)
        z0 = h0 + 100.0 * torch.randn(h0.shape, generator=torch.Generator().manual_seed(1))
    assert noisy.loc[0, "dcor"] == pytest.approx(float(metrics.distance_correlation(x, z0)), rel=1e-12)
    assert net.training and all(p.grad is None for p in net.parameters())


def test_bad_profile_input_names_the_problem():
    net, x = _net(), torch.randn(10, 6)
    with pytest.raises(ValueError, match="nn.Sequential"):
        leakage_profile(nn.Linear(6, 2), x)
    with pytest.raises(ValueError, match="at least 4 samples"):
        leakage_profile(net, x[:3])
    with pytest.raises(ValueError, match="n = 20 but x holds only 10"):
        leakage_profile(net, x, n=20)
    with pytest.raises(ValueError, match="shapes do not chain"):
        leakage_profile(net, torch.randn(10, 5))
    with pytest.raises(ValueError, match="transform must be callable"):
        leakage_profile(net, x, transform=3)
    with pytest.raises(ValueError, match="expected a tensor of 10 rows"):
        leakage_profile(net, x, transform=lambda t, kind: t[:2])
    assert isinstance(leakage_profile(net, x), pd.DataFrame)
