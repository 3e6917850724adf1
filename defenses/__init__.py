"""Defenses, in three shapes: loss terms (e.g. NoPeek), wire transforms (e.g. activation noise), and
client- or server-side wrappers (detectors, secure aggregation, differential privacy).

Here now: NoPeek (Vepakomma et al., 2020); SplitGuard-style detection of training hijacking (Erdogan
et al., 2022).
"""
from defenses.nopeek import NoPeek, NoPeekLoss
from defenses.splitguard import SplitGuard, guarded_split_training

__all__ = ["NoPeek", "NoPeekLoss", "SplitGuard", "guarded_split_training"]
