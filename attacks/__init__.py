"""Attacks on split and federated learning. Each reads only a transcript of what its party received
(``wire.observed(by=...)``) plus the knowledge its threat model grants, and returns an AttackResult;
score it with ``toolkit.metrics.evaluate(result, truth)``.

Split learning: model inversion of cut-layer activations in three threat models (white-box,
inverse network, query-free; He et al., 2019), UnSplit and its label inference (Erdogan et al.,
2022), feature-space hijacking (Pasquini et al., 2021), label leakage from cut-layer gradients
(Li et al., 2022). Federated learning: gradient inversion of client updates, DLG (Zhu et al., 2019),
iDLG (Zhao et al., 2020) and Inverting Gradients (Geiping et al., 2020), on one gradient-matching
core that also attacks cut-layer gradients; analytic recovery from a linear layer (and by imprint
bins, Fowl et al., 2022) and batch label counts; poisoning clients for robust-aggregation experiments.
"""
from attacks.analytic import AnalyticFC, LabelCounts, imprint_block, label_counts
from attacks.base import Attack, AttackResult
from attacks.fsha import FeatureSpaceHijacking
from attacks.gradient_inversion import DLG, IDLG, GradientInversion, InvertingGradients
from attacks.label_leakage import DirectionAttack, NormAttack, leak_auc_summary, per_batch_auc
from attacks.model_inversion import InverseNetwork, QueryFree, WhiteBoxInversion
from attacks.poisoning import POISONING, GaussianUpdate, ScaledUpdate, SignFlip
from attacks.seed_recovery import SeedRecovery
from attacks.unsplit import UnSplit
from attacks.unsplit_labels import UnSplitLabels

ATTACKS: dict[str, type[Attack]] = {
    "white_box_inversion": WhiteBoxInversion,
    "inverse_network": InverseNetwork,
    "query_free": QueryFree,
    "unsplit": UnSplit,
    "unsplit_labels": UnSplitLabels,
    "fsha": FeatureSpaceHijacking,
    "norm": NormAttack,
    "direction": DirectionAttack,
    "dlg": DLG,
    "idlg": IDLG,
    "inverting_gradients": InvertingGradients,
    "analytic_fc": AnalyticFC,
    "label_counts": LabelCounts,
}

__all__ = ["ATTACKS", "AnalyticFC", "DLG", "IDLG", "POISONING", "Attack", "AttackResult", "DirectionAttack",
           "FeatureSpaceHijacking", "GaussianUpdate", "GradientInversion", "InvertingGradients", "LabelCounts", "InverseNetwork", "NormAttack", "QueryFree", "ScaledUpdate", "SeedRecovery", "SignFlip", "UnSplit",
           "UnSplitLabels", "WhiteBoxInversion", "imprint_block", "label_counts", "leak_auc_summary", "per_batch_auc"]
from attacks.explorer import EXPLORER_ATTACKS  # noqa: E402  (the leakage explorer's registry)
__all__ += ["EXPLORER_ATTACKS"]
