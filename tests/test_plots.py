import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from toolkit import plots  # noqa: E402
from toolkit.progress import progress  # noqa: E402
from toolkit.wire import Wire  # noqa: E402


def test_image_grid_tiles_in_order_with_gaps():
    imgs = torch.arange(6, dtype=torch.float32).reshape(6, 1, 1, 1)
    grid = plots.image_grid(imgs, nrow=3)
    assert grid.shape == (3, 5)  # 2 rows x 3 cols of 1x1 tiles, 1-pixel gaps
    assert grid[0, 0] == 0 and grid[0, 2] == 1 and grid[2, 4] == 5 and np.isnan(grid[1, 0])
    rgb = plots.image_grid(torch.rand(4, 3, 5, 5))
    assert rgb.shape == (11, 11, 3)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        plots.image_grid(torch.rand(2, 4, 5, 5))


def test_helpers_draw_into_a_given_axis_and_return_fig_ax():
    fig, axes = plt.subplots(1, 4)
    history = pd.DataFrame({"step": [1, 2, 3], "loss": [2.0, 1.0, 0.5]})
    wire = Wire()
    wire.send(torch.zeros(3), sender="client", receiver="server", kind="activations")
    calls = [
        plots.plot_images(torch.rand(4, 1, 8, 8), ax=axes[0], title="x"),
        plots.plot_activations(torch.rand(2, 16, 8, 8), ax=axes[1]),
        plots.plot_history(history, "loss", ax=axes[2]),
        plots.plot_communication(wire.summary(), ax=axes[3]),
    ]
    for (f, a), ax in zip(calls, axes):
        assert f is fig and a is ax
    assert axes[0].get_title() == "x" and len(axes[2].lines) == 1
    plt.close(fig)


def test_helpers_make_their_own_figure_when_no_axis_is_given():
    fig, ax = plots.plot_activations(torch.rand(10, 32))
    assert ax.figure is fig and ax.get_xlabel() == "unit"
    plt.close(fig)


def test_bad_plot_input_names_the_problem():
    with pytest.raises(ValueError, match="no column 'acc'"):
        plots.plot_history(pd.DataFrame({"step": [1], "loss": [1.0]}), "acc")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) or \(B, D\)"):
        plots.plot_activations(torch.rand(3))


def test_progress_is_off_by_default_and_a_tqdm_bar_when_asked():
    items = [1, 2, 3]
    assert progress(items) is items
    bar = progress(items, show=True, desc="x")
    assert list(bar) == items and hasattr(bar, "close")
