"""The labels behind an update, as a gradient-matching attack obtains them: optimized with the
input (``"joint"``, DLG: Zhu, Liu, Han, "Deep leakage from gradients", 2019), read from the sign of
the last layer's gradient for one sample (``"idlg"``: Zhao, Mopuri, Bilen, "iDLG: Improved deep
leakage from gradients", 2020), counted for a batch (``"counts"``,
:func:`attacks.analytic.label_counts`), chosen by the setting (``"auto"``), or known (a tensor).

Example:
    >>> g = {"fc.weight": torch.zeros(3, 2), "fc.bias": torch.tensor([0.2, -0.5, 0.3])}
    >>> idlg_label(g)  # p - onehot(y) is negative only at the true class
    1
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from attacks.gradient_matching import Update, last_layer

__all__ = ["LABEL_STRATEGIES", "idlg_label", "check_strategy", "known_labels"]

LABEL_STRATEGIES = ("joint", "idlg", "counts", "auto")


def idlg_label(gradient: dict[str, Tensor]) -> int:
    """The label of a single sample from the last layer's gradient (Zhao et al., iDLG, 2020): for
    cross-entropy the bias gradient p - onehot(y) is negative only at the true class; without a
    bias, the weight row of the true class sums negative when the penultimate activations are
    non-negative (sigmoid, ReLU)."""
    weight, bias = last_layer(gradient)
    return int(gradient[bias].argmin()) if bias is not None else int(gradient[weight].sum(dim=1).argmin())


def check_strategy(labels: str | Tensor, *, batch_size: int, wrt: str) -> None:
    """ValueError unless ``labels`` (a strategy name or a tensor) fits the attack's setting."""
    if isinstance(labels, Tensor):
        return
    if labels not in LABEL_STRATEGIES:
        raise ValueError(f"labels must be one of {LABEL_STRATEGIES} or a tensor, got {labels!r}")
    if labels == "idlg" and batch_size != 1:
        raise ValueError(f"iDLG reads the label of a single sample; batch_size is {batch_size}: "
                         f"use labels='counts' or 'joint'")
    if labels in ("idlg", "counts") and wrt == "input":
        raise ValueError(f"labels={labels!r} reads a federated update's last layer; on the split side "
                         f"(wrt='input') the labels are 'joint' (recovered) or a tensor (known)")


def known_labels(labels: str | Tensor, update: Update, model: nn.Module, *, batch_size: int, local_steps: int,
                 input_shape: tuple, generator: torch.Generator | None) -> Tensor | None:
    """The labels (N,) the attack fixes for ``update``, or None when it optimizes them (joint)."""
    if isinstance(labels, Tensor):
        return labels
    strategy = labels
    if strategy == "auto":  # counts assume one local step; after several, optimize the labels
        strategy = "idlg" if batch_size == 1 else "counts" if local_steps == 1 else "joint"
    if strategy == "joint":
        return None  # optimized with the input (DLG)
    if strategy == "idlg":
        return torch.tensor([idlg_label(update.gradient)])
    from attacks.analytic import label_counts  # analytic imports gradient_matching too: import when used

    gradient = update.gradient if local_steps == 1 else {k: v / local_steps for k, v in update.gradient.items()}
    counts = label_counts(gradient, model, update.weights, batch_size=batch_size, input_shape=input_shape,
                          generator=generator)
    return torch.repeat_interleave(torch.arange(len(counts)), counts)
