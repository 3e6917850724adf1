"""Attacks on split and federated learning. Each reads only a transcript of what its party received
(``wire.observed(by=...)``) plus the knowledge its threat model grants, and returns an AttackResult;
score it with ``toolkit.metrics.evaluate(result, truth)``.

Split learning: model inversion of cut-layer activations in three threat models (white-box,
inverse network, query-free; He et al., 2019), UnSplit and its label inference (Erdogan et al.,
2022), feature-space hijacking (Pasquini et al., 2021), label leakage from cut-layer gradients
(Li et al., 2022). Federated learning: poisoning clients for robust-aggregation experiments.
"""
from attacks.base import Attack, AttackResult
from attacks.fsha import FeatureSpaceHijacking
from attacks.label_leakage import DirectionAttack, NormAttack, leak_auc_summary, per_batch_auc
from attacks.model_inversion import InverseNetwork, QueryFree, WhiteBoxInversion
from attacks.poisoning import POISONING, GaussianUpdate, ScaledUpdate, SignFlip
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
}

__all__ = ["ATTACKS", "POISONING", "Attack", "AttackResult", "DirectionAttack", "FeatureSpaceHijacking",
           "GaussianUpdate", "InverseNetwork", "NormAttack", "QueryFree", "ScaledUpdate", "SignFlip", "UnSplit",
           "UnSplitLabels", "WhiteBoxInversion", "leak_auc_summary", "per_batch_auc"]
