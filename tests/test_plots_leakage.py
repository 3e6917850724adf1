import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from toolkit import plots  # noqa: E402
from toolkit.leakage import leakage_profile  # noqa: E402


def _profile(n=40, dim_over_n=False):
    torch.manual_seed(0)
    width = 80 if dim_over_n else 8
    net = nn.Sequential(nn.Linear(5, width), nn.ReLU(), nn.Linear(width, 2))
    return leakage_profile(net, torch.randn(n, 5, generator=torch.Generator().manual_seed(0)))


def test_leakage_profile_draws_each_statistic_per_layer_and_one_line_per_hue():
    clean = _profile()
    fig, ax = plots.plot_leakage_profile(clean)
    (line,) = ax.lines
    assert list(line.get_ydata()) == list(clean["dcor"])  # dim <= n: the plain statistic
    assert [t.get_text() for t in ax.get_xticklabels()] == list(clean["layer"])
    assert "dCor" in ax.get_ylabel() and "layer" in ax.get_xlabel()
    plt.close(fig)
    wide = _profile(n=20, dim_over_n=True)  # 80 values per sample from 20 samples: bias-corrected
    fig, ax = plots.plot_leakage_profile(wide)
    assert list(ax.lines[0].get_ydata()) == list(wide["dcor_unbiased"]) and "bias-corrected" in ax.get_ylabel()
    plt.close(fig)
    both = pd.concat([clean.assign(defense="none"), clean.assign(defense="noise", dcor=clean["dcor"] / 2)])
    fig, ax = plots.plot_leakage_profile(both, hue="defense", statistic="dcor")
    assert len(ax.lines) == 2 and [t.get_text() for t in ax.get_legend().get_texts()] == ["none", "noise"]
    assert np.allclose(ax.lines[1].get_ydata(), clean["dcor"] / 2)
    plt.close(fig)
    with pytest.raises(ValueError, match="no column 'defense'"):
        plots.plot_leakage_profile(clean, hue="defense")
    with pytest.raises(ValueError, match="unknown statistic 'r2'"):
        plots.plot_leakage_profile(clean, statistic="r2")


def test_attribution_map_is_drawn_on_a_symmetric_shared_scale_with_a_colorbar():
    g = torch.Generator().manual_seed(0)
    x, a = torch.rand(3, 1, 6, 6, generator=g), torch.randn(3, 1, 6, 6, generator=g)
    fig, ax = plots.plot_attribution(x, a, n=2)
    top, heat = ax.images
    vmax = float(a[:2].abs().max())
    assert heat.get_clim() == pytest.approx((-vmax, vmax))
    assert np.allclose(heat.get_array()[:6, :6], a[0, 0].numpy()) and np.allclose(heat.get_array()[:6, 7:13], a[1, 0].numpy())
    assert np.allclose(top.get_array()[:6, :6], x[0, 0].numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == ["input", "attribution"]
    assert any(c.get_label() == "<colorbar>" and "attribution" in c.get_ylabel() for c in fig.axes)
    plt.close(fig)
    with pytest.raises(ValueError, match="differ in shape"):
        plots.plot_attribution(x, a[:, :, :5])
    with pytest.raises(ValueError, match="plot_feature_attribution"):
        plots.plot_attribution(torch.rand(3, 10), torch.rand(3, 10))


def test_feature_attribution_bars_are_the_mean_per_feature_largest_first():
    a = torch.tensor([[1.0, -4.0, 0.5], [3.0, -2.0, 0.5]])
    fig, ax = plots.plot_feature_attribution(a, ["age", "dose", "weight"])
    widths = [p.get_width() for p in ax.patches]
    assert widths == [-3.0, 2.0, 0.5]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["dose", "age", "weight"]
    assert ax.get_xlabel() == "mean attribution over 2 samples (red raises, blue lowers)" and ax.get_ylabel() == "feature"
    plt.close(fig)
    fig, ax = plots.plot_feature_attribution(a, top=1)
    assert len(ax.patches) == 1 and ax.get_yticklabels()[0].get_text() == "feature 1"
    plt.close(fig)
    with pytest.raises(ValueError, match="2 feature names for 3 features"):
        plots.plot_feature_attribution(a, ["a", "b"])


def test_embedding_places_each_sample_once_coloured_by_label():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(30) % 3
    z = torch.randn(30, 4, 2, generator=g) + 5 * labels[:, None, None]
    fig, ax = plots.plot_embedding(z, labels)
    assert sum(len(c.get_offsets()) for c in ax.collections) == 30
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["0", "1", "2"]
    assert ax.get_xlabel().startswith("PC 1 (") and "% of variance" in ax.get_ylabel()
    from sklearn.decomposition import PCA

    expected = PCA(n_components=2, svd_solver="full").fit_transform(z.flatten(1).double().numpy())
    assert np.allclose(np.abs(ax.collections[0].get_offsets()), np.abs(expected[labels.numpy() == 0]))
    plt.close(fig)
    f1, a1 = plots.plot_embedding(z, labels, method="tsne", seed=3)
    f2, a2 = plots.plot_embedding(z, labels, method="tsne", seed=3)
    assert np.array_equal(a1.collections[0].get_offsets(), a2.collections[0].get_offsets())  # same seed, same map
    assert a1.get_xlabel().startswith("t-SNE 1")
    plt.close(f1), plt.close(f2)
    with pytest.raises(ValueError, match="unknown method 'umap'"):
        plots.plot_embedding(z, labels, method="umap")
    with pytest.raises(ValueError, match="30 feature rows but 29 labels"):
        plots.plot_embedding(z, labels[:29])


def _history():
    rows = []
    for epoch in range(2):
        for k in range(4):
            last = k == 3
            rows.append({"epoch": epoch, "step": 4 * epoch + k + 1, "loss": 2.0 - 0.2 * (4 * epoch + k),
                         "accuracy": 0.1 * (4 * epoch + k), "test_accuracy": 0.5 + 0.2 * epoch if last else np.nan,
                         "dcor": 0.9 - 0.1 * epoch if last else np.nan})
    return pd.DataFrame(rows)


def test_training_plot_draws_loss_accuracy_and_only_the_recorded_dcor_values():
    h = _history()
    fig, axes = plots.plot_training(h)
    assert len(axes) == 3
    loss, acc, dcor = axes
    assert list(loss.lines[0].get_ydata()) == list(h["loss"])
    assert list(loss.lines[0].get_xdata()) == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]  # epochs of progress
    assert list(acc.lines[1].get_ydata()) == [0.5, 0.7] and list(acc.lines[1].get_xdata()) == [1.0, 2.0]
    assert list(dcor.lines[0].get_ydata()) == [0.9, 0.8]  # the NaN rows are left out
    for ax in axes:
        assert ax.get_xlabel() == "epoch" and ax.get_ylabel()
    plt.close(fig)
    fig, axes = plots.plot_training(h.drop(columns=["dcor"]))
    assert len(axes) == 2
    plt.close(fig)
    with pytest.raises(ValueError, match="no column 'epoch'"):
        plots.plot_training(h.drop(columns=["epoch"]))
