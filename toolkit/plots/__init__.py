"""Figures. Every helper takes ``ax=None`` (a multi-panel figure ``fig=None``) and returns
``(fig, ax)`` (or ``(fig, axes)``); none calls ``plt.show()``."""
from toolkit.plots._base import LABELS, _axes, byte_unit, image_grid
from toolkit.plots.curves import plot_communication, plot_history, plot_partition, plot_tradeoff
from toolkit.plots.images import plot_activations, plot_images, plot_reconstruction_grid, plot_server_view

__all__ = ["LABELS", "byte_unit", "image_grid", "plot_activations", "plot_communication", "plot_history",
           "plot_images", "plot_partition", "plot_reconstruction_grid", "plot_server_view", "plot_tradeoff"]
