"""Defenses, in three shapes: loss terms (e.g. NoPeek), wire transforms (e.g. activation noise), and
client- or server-side wrappers (detectors, secure aggregation, differential privacy).

Here now: SplitGuard-style detection of training hijacking (Erdogan et al., 2022); splintering
(Vepakomma, Balla, Raskar, 2020); label defenses (Li et al., 2022); DP-FedAvg and per-client
DP-SGD accounting (McMahan et al., 2018; Abadi et al., 2016).
"""
from defenses.dp_federated import DPFedAvg, LocalDPAccountant
from defenses.labels import IsotropicNoise, Marvell, MaxNorm
from defenses.splitguard import SplitGuard, guarded_split_training
from defenses.splintering import Splinter, inner_products, outsource, splintered, span_attack
from defenses.splintering_split import SplinteredLayer, first_linear

__all__ = [
    "DPFedAvg", "LocalDPAccountant",
    "IsotropicNoise", "Marvell", "MaxNorm",
    "SplitGuard", "guarded_split_training",
    "Splinter", "inner_products", "outsource", "splintered", "span_attack", "SplinteredLayer", "first_linear",
]
