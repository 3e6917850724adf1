import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from toolkit import metrics, plots  # noqa: E402


def _colorbar_label(fig) -> list[str]:
    return [a.get_ylabel() for a in fig.axes if a.get_label() == "<colorbar>"]


def test_communication_bars_are_megabytes_from_zero_and_labelled():
    summary = pd.DataFrame({"party": ["client", "server"], "bytes_up": [12_500_000, 10_000_000],
                            "bytes_down": [10_000_000, 12_500_000]})
    fig, ax = plots.plot_communication(summary)
    heights = sorted(round(p.get_height(), 6) for p in ax.patches if p.get_height() > 0)
    assert heights == [10.0, 10.0, 12.5, 12.5]  # bytes / 1e6
    assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
    assert ax.get_ylabel() == "MB on the wire" and ax.get_xlabel() == "party"
    labels = sorted(t.get_text() for t in ax.texts)
    assert labels == ["10", "10", "12.5", "12.5"]
    plt.close(fig)


def test_communication_unit_follows_the_largest_value():
    assert plots.byte_unit(999) == (1.0, "bytes") and plots.byte_unit(1500) == (1e3, "kB")
    assert plots.byte_unit(2e9) == (1e9, "GB")
    fig, ax = plots.plot_communication(pd.DataFrame({"party": ["a"], "bytes_up": [3000], "bytes_down": [1500]}))
    assert ax.get_ylabel() == "kB on the wire"
    assert sorted(p.get_height() for p in ax.patches if p.get_height() > 0) == [1.5, 3.0]
    plt.close(fig)
    with pytest.raises(ValueError, match="no column 'bytes_up'"):
        plots.plot_communication(pd.DataFrame({"party": ["a"]}))


def test_activation_grid_numbers_each_channel_on_one_colour_scale():
    z = torch.rand(2, 6, 5, 5) * 3
    fig, ax = plots.plot_activations(z, sample=1)
    assert sorted(int(t.get_text()) for t in ax.texts) == list(range(6))
    im = ax.images[0]
    assert im.get_clim() == pytest.approx((float(z[1].min()), float(z[1].max())))
    assert _colorbar_label(fig) == ["activation"] and "image 1" in ax.get_xlabel()
    # the raw values are drawn (not rescaled per map): tile 0 is channel 0 of sample 1
    assert np.allclose(im.get_array()[:5, :5], z[1, 0].numpy())
    plt.close(fig)
    with pytest.raises(ValueError, match="sample 5 is out of range"):
        plots.plot_activations(z, sample=5)


def test_server_view_puts_inputs_beside_their_activations():
    x, z = torch.rand(5, 1, 8, 8), torch.randn(5, 4, 3, 3)
    fig, axes = plots.plot_server_view(x, z, n=3)
    assert axes.shape == (3, 2)
    for i in range(3):
        assert np.allclose(axes[i, 0].images[0].get_array(), x[i, 0].numpy())
        assert np.allclose(axes[i, 1].images[0].get_array()[:3, :3], z[i, 0].numpy())
        assert axes[i, 0].get_ylabel() == f"sample {i}"
        assert axes[i, 1].images[0].get_clim() == pytest.approx((float(z[:3].min()), float(z[:3].max())))
    assert _colorbar_label(fig) == ["activation"]
    plt.close(fig)
    fig, axes = plots.plot_server_view(torch.rand(4, 10), torch.randn(4, 32), n=2)  # tabular, flat
    assert axes[1, 1].images[0].get_array().shape == (1, 32) and axes[-1, 1].get_xlabel() == "unit"
    plt.close(fig)
    with pytest.raises(ValueError, match="3 inputs but 4 activations"):
        plots.plot_server_view(torch.rand(3, 1, 8, 8), torch.rand(4, 2, 3, 3))
    with pytest.raises(ValueError, match=r"activations must be \(B, C, H, W\) or \(B, D\)"):
        plots.plot_server_view(torch.rand(3, 1, 8, 8), torch.rand(3, 2, 3))


def test_reconstruction_grid_prints_psnr_and_ssim_under_each_reconstruction():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 12, 12, generator=g)
    rec = (x + 0.1 * torch.randn(6, 1, 12, 12, generator=g)).clamp(0, 1)
    fig, ax = plots.plot_reconstruction_grid({"original": x, "attack": rec.flatten(1)}, n=4)  # flat rows reshape
    expected = [f"{float(p):.1f} / {float(s):.2f}" for p, s in zip(metrics.psnr(rec[:4], x[:4]), metrics.ssim(rec[:4], x[:4]))]
    assert [t.get_text() for t in ax.texts] == expected
    assert [t.get_text() for t in ax.get_yticklabels()] == ["original", "attack"]
    assert "PSNR (dB) / SSIM" in ax.get_xlabel()
    top = ax.images[0].get_array()[:12, :12]
    assert np.allclose(top, x[0, 0].numpy())  # the originals are the top row
    plt.close(fig)
    fig, ax = plots.plot_reconstruction_grid({"original": x, "attack": rec}, n=3, scores=False)
    assert len(ax.texts) == 0
    plt.close(fig)
    with pytest.raises(ValueError, match="row 'bad' holds images of shape"):
        plots.plot_reconstruction_grid({"original": x, "bad": torch.rand(6, 5)})
    with pytest.raises(ValueError, match="non-empty dict"):
        plots.plot_reconstruction_grid({})
