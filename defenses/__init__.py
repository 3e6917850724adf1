"""Defenses, in three shapes: loss terms (e.g. NoPeek), wire transforms (e.g. activation noise), and
client- or server-side wrappers (detectors, secure aggregation, differential privacy).

Here now: SplitGuard-style detection of training hijacking (Erdogan et al., 2022); splintering
(Vepakomma, Balla, Raskar, 2020).
"""
from defenses.labels import IsotropicNoise, Marvell, MaxNorm
from defenses.splitguard import SplitGuard, guarded_split_training
from defenses.splintering import Splinter, inner_products, outsource, splintered, span_attack
from defenses.splintering_split import SplinteredLayer, first_linear

__all__ = ["SplitGuard", "guarded_split_training", "Splinter", "inner_products", "outsource", "splintered",
           "span_attack", "SplinteredLayer", "first_linear", "IsotropicNoise", "MaxNorm", "Marvell"]
