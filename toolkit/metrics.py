"""Leakage and cost metrics: distance correlation (from :mod:`toolkit.dependence`), reconstruction
quality (MSE, PSNR, SSIM), label recovery (accuracy, ROC AUC), bytes; ``evaluate`` scores an
attack's result.
"""
from __future__ import annotations

import torch
from torch import Tensor

from toolkit.dependence import (distance_correlation, distance_correlation_chunked, u_distance_correlation_sqr,
                                u_distance_correlation_sqr_chunked, u_distance_covariance_sqr)

__all__ = ["auc", "distance_correlation", "distance_correlation_chunked", "evaluate", "format_bytes", "match", "mse",
           "psnr", "ssim", "u_distance_correlation_sqr", "u_distance_correlation_sqr_chunked",
           "u_distance_covariance_sqr"]

# -- reconstruction and label metrics ------------------------------------------------------
def _images(x: Tensor) -> Tensor:
    x = torch.as_tensor(x).detach().float()
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4:
        raise ValueError(f"image metrics need (N, C, H, W) or (N, H, W) images, got shape {tuple(x.shape)}")
    return x.clamp(0, 1)  # images in [0, 1], clipped to the data range before scoring


def _pair_images(pred: Tensor, truth: Tensor) -> tuple[Tensor, Tensor]:
    pred, truth = _images(pred), _images(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"reconstruction {tuple(pred.shape)} and truth {tuple(truth.shape)} differ in shape")
    return pred, truth


def mse(pred: Tensor, truth: Tensor) -> Tensor:
    """Per-sample mean squared error (N,), on images clipped to [0, 1]."""
    pred, truth = _pair_images(pred, truth)
    return ((pred - truth) ** 2).flatten(1).mean(1)


def psnr(pred: Tensor, truth: Tensor) -> Tensor:
    """Per-sample peak signal-to-noise ratio in dB (N,), data range 1 (torchmetrics)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    pred, truth = _pair_images(pred, truth)
    return peak_signal_noise_ratio(pred, truth, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(pred: Tensor, truth: Tensor) -> Tensor:
    """Per-sample structural similarity (N,), data range 1, Gaussian window of 11 pixels (or the
    largest odd size that fits smaller images), as torchmetrics computes it."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    pred, truth = _pair_images(pred, truth)
    size = min(11, min(pred.shape[-2:]) - (1 - min(pred.shape[-2:]) % 2))
    return structural_similarity_index_measure(pred, truth, data_range=1.0, reduction="none",
                                               kernel_size=size, sigma=1.5 * size / 11)


def auc(scores: Tensor, labels: Tensor) -> float:
    """ROC AUC of ``scores`` for binary ``labels`` (scikit-learn); NaN when one class is absent."""
    from sklearn.metrics import roc_auc_score

    labels = torch.as_tensor(labels).flatten()
    if labels.unique().numel() < 2:
        return float("nan")
    return float(roc_auc_score(labels.numpy(), torch.as_tensor(scores).detach().double().flatten().numpy()))


def match(pred: Tensor, truth: Tensor) -> Tensor:
    """Order of ``pred`` that best matches ``truth`` one to one (Hungarian, on MSE): pred[order] ~ truth."""
    from scipy.optimize import linear_sum_assignment

    p, t = _images(pred).flatten(1).double(), _images(truth).flatten(1).double()
    cost = torch.cdist(t, p) ** 2  # (N_truth, N_pred)
    rows, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(cols)[torch.as_tensor(rows).argsort()]


def evaluate(result, truth: Tensor | None = None, *, labels: Tensor | None = None,
             matched: bool = False) -> dict[str, float]:
    """Score an attack's result against ground truth the caller kept.

    Args:
        result: an ``AttackResult`` (reconstruction, labels and/or scores).
        truth: the private inputs the reconstruction should match, (N, C, H, W) in [0, 1].
        labels: the private labels (label accuracy for inferred labels; ROC AUC for scores).
        matched: the reconstruction's order is unknown: match it to ``truth`` one to one first.

    Returns:
        Means over samples: ``mse``, ``psnr``, ``ssim`` (images), ``label_accuracy``, ``auc``.
    """
    out: dict[str, float] = {}
    rec = getattr(result, "reconstruction", None)
    if truth is not None:
        if rec is None:
            raise ValueError("the result holds no reconstruction to compare with the truth")
        rec = rec.reshape(truth.shape) if rec.numel() == truth.numel() else rec
        if matched:
            rec = rec[match(rec, truth)]
        out.update(mse=float(mse(rec, truth).mean()), psnr=float(psnr(rec, truth).mean()),
                   ssim=float(ssim(rec, truth).mean()))
    if labels is not None:
        inferred, scores = getattr(result, "labels", None), getattr(result, "scores", None)
        if inferred is None and scores is None:
            raise ValueError("the result holds neither labels nor scores to compare with the labels")
        if inferred is not None:
            if len(inferred) != len(labels):
                raise ValueError(f"{len(inferred)} inferred labels for {len(labels)} true ones")
            out["label_accuracy"] = float((torch.as_tensor(inferred) == torch.as_tensor(labels)).double().mean())
        if scores is not None:
            out["auc"] = auc(scores, labels)
    return out


def format_bytes(n: float) -> str:
    """Human-readable byte count: ``format_bytes(1536) == '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
