"""How much of the input each layer's output still carries: a leakage profile over a network.

For every layer of an ``nn.Sequential`` (a cut just after it sends that output to the server),
:func:`leakage_profile` measures the distance correlation between the inputs and that output,
as NoPeek does at one cut (Vepakomma et al., "NoPeek: Information leakage reduction to share
activations in distributed deep learning", 2020), with two statistics:

* ``dcor``: the sample distance correlation (Székely, Rizzo, Bakirov, 2007), a V-statistic that is
  biased upward when the output's dimension is large against the number of samples ``n``;
* ``dcor_unbiased``: ``sqrt(max(u, 0))`` of the bias-corrected squared distance correlation ``u``
  (Székely & Rizzo, "The distance correlation t-test of independence in high dimension", 2013),
  near 0 for independent data at any dimension: read this one where ``n`` is small against ``dim``.

A Wire defense (any transform ``t(tensor, kind="activations")``) given as ``transform`` is applied
to each layer's output before measuring, as if the cut were there; the next layers still run on
the clean output (they are on the server's side of that cut).
"""
from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch
from torch import Tensor, nn

from toolkit import metrics, validate
from toolkit.models import _run_layer

__all__ = ["leakage_profile"]

COLUMNS = ["index", "layer", "type", "dim", "n", "dcor", "dcor_unbiased"]


def leakage_profile(model: nn.Sequential, x: Tensor, *, transform: Callable | None = None,
                    n: int | None = None) -> pd.DataFrame:
    """Distance correlation between ``x`` and every layer's output of ``model``.

    Args:
        model: an ``nn.Sequential`` (every zoo model is one); run in eval mode without gradients,
            its train/eval modes restored afterwards.
        x: inputs (N, ...), the first ``n`` of them used (all when ``n`` is None); n >= 4.
        transform: a Wire transform or defense ``t(tensor, kind="activations")`` applied to each
            layer's output before measuring (what the server would receive with a cut there).
        n: how many samples to use.

    Returns:
        One row per layer, in order: ``index`` (a cut ``at=index`` keeps layers up to this one, as in
        :func:`toolkit.models.layer_table`), ``layer`` (its name), ``type``, ``dim`` (output values
        per sample), ``n``, ``dcor`` and ``dcor_unbiased`` (see the module docstring).
    """
    if not isinstance(model, nn.Sequential) or len(model) == 0:
        raise ValueError(f"leakage_profile needs a non-empty nn.Sequential, got {type(model).__name__}")
    x = validate.tensor(x, "x", min_dim=1)
    if not x.is_floating_point():
        raise ValueError(f"x must hold floating-point inputs, got {x.dtype}")
    if n is not None:
        n = validate.positive_int("n", n)
        if n > len(x):
            raise ValueError(f"n = {n} but x holds only {len(x)} samples")
        x = x[:n]
    if len(x) < 4:
        raise ValueError(f"leakage_profile needs at least 4 samples (the bias-corrected statistic), got {len(x)}")
    if transform is not None and not callable(transform):
        raise ValueError(f"transform must be callable as t(tensor, kind='activations'), got {type(transform).__name__}")
    x = x.detach()
    rows, h = [], x
    for index, (name, layer) in enumerate(model.named_children(), start=1):
        h = _run_layer(layer, h, f"layer {name!r} ({layer})")
        with torch.no_grad():
            seen = transform(h, kind="activations") if transform is not None else h
        if not isinstance(seen, Tensor) or seen.shape[0] != len(x):
            raise ValueError(f"transform returned {type(seen).__name__} "
                             f"{tuple(seen.shape) if isinstance(seen, Tensor) else ''} at layer {name!r}; "
                             f"expected a tensor of {len(x)} rows")
        u = float(metrics.u_distance_correlation_sqr(x, seen))
        rows.append({"index": index, "layer": name, "type": type(layer).__name__, "dim": int(seen[0].numel()),
                     "n": len(x), "dcor": float(metrics.distance_correlation(x, seen)),
                     "dcor_unbiased": max(u, 0.0) ** 0.5})
    return pd.DataFrame(rows, columns=COLUMNS)
