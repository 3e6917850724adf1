"""Defenses, in three shapes: loss terms (e.g. NoPeek), wire transforms (e.g. activation noise), and
client- or server-side wrappers (detectors, secure aggregation, differential privacy).

Here now: SplitGuard-style detection of training hijacking (Erdogan et al., 2022); DP-SGD through
Opacus (defenses.dp, defenses.dp_split) and local DP on the Wire (defenses.dp_local), with defenses.accounting.
"""
from defenses.dp import DPSGD, make_private
from defenses.dp_local import GaussianMechanism
from defenses.dp_split import DPParty, private_party
from defenses.splitguard import SplitGuard, guarded_split_training

__all__ = ["DPParty", "DPSGD", "GaussianMechanism", "SplitGuard", "guarded_split_training", "make_private", "private_party"]
