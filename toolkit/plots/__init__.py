"""Figures. Every helper takes ``ax=None`` (a multi-panel figure ``fig=None``) and returns
``(fig, ax)`` (or ``(fig, axes)``); none calls ``plt.show()``."""
from toolkit.plots._base import LABELS, _axes, byte_unit, image_grid
from toolkit.plots.attribution import plot_attribution, plot_feature_attribution
from toolkit.plots.curves import plot_communication, plot_history, plot_partition, plot_tradeoff
from toolkit.plots.images import plot_activations, plot_images, plot_reconstruction_grid, plot_server_view
from toolkit.plots.leakage import plot_embedding, plot_leakage_profile
from toolkit.plots.training import plot_training

__all__ = ["LABELS", "byte_unit", "image_grid", "plot_activations", "plot_attribution", "plot_communication",
           "plot_embedding", "plot_feature_attribution", "plot_history", "plot_images", "plot_leakage_profile",
           "plot_partition", "plot_reconstruction_grid", "plot_server_view", "plot_tradeoff", "plot_training"]
