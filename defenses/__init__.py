"""Defenses, in three shapes: loss terms (e.g. NoPeek), wire transforms (e.g. activation noise), and
client- or server-side wrappers (detectors, secure aggregation, differential privacy).

Here now: SplitGuard-style detection of training hijacking (Erdogan et al., 2022).
"""
from defenses.activations import ACTIVATION_DEFENSES, Clip, CutDropout, GaussianNoise, LaplaceNoise, Quantize  # noqa: F401
from defenses.splitguard import SplitGuard, guarded_split_training

__all__ = ["SplitGuard", "guarded_split_training"]
