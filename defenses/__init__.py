"""Defenses, in three shapes: loss terms (e.g. NoPeek), wire transforms (e.g. activation noise), and
client- or server-side wrappers (detectors, secure aggregation, differential privacy).

Here now:

- loss terms and split hooks: NoPeek (Vepakomma et al., 2020); label defenses, max-norm and
  Marvell (Li et al., 2022); SplitGuard-style detection of training hijacking (Erdogan et al., 2022);
- Wire transforms: activation noise, cut-layer dropout, quantization, clipping (He et al., 2020);
  gradient defenses for federated updates, pruning, quantization, noise (Zhu et al., 2019);
  splintering's shares and decoys (Vepakomma, Balla, Raskar, 2020); local DP (the Gaussian mechanism);
- wrappers: DP-SGD through Opacus for a party (dp, dp_split) and DP-FedAvg (McMahan et al., 2018),
  all accounted by toolkit.accounting;
- private aggregation over the Wire (WireAggregators for FederatedAveraging): SecureAggregation and
  SecAggPlus (Bonawitz et al., 2017; Bell et al., 2020), HomomorphicAggregation (CKKS), DPAggregation
  (central, distributed, local DP), Cohorts and Shuffled; built from secure aggregation's
  primitives after Bonawitz et al. (2017) in ``defenses.secagg`` (X25519 + HKDF seeds, ChaCha20
  masks, Shamir sharing, fixed-point ring encoding), homomorphic aggregation with CKKS through
  TenSEAL (homomorphic), and hash commitments for verifiable participation (commitments).
"""
from defenses.aggregation_dp import DPAggregation
from defenses.activations import ACTIVATION_DEFENSES, Clip, CutDropout, GaussianNoise, LaplaceNoise, Quantize
from defenses.cohorts import Cohorts
from defenses.commitments import Opening, check_openings, commit, verify
from defenses.dp import DPSGD, make_private
from defenses.dp_federated import DPFedAvg
from defenses.dp_local import GaussianMechanism
from defenses.dp_split import DPClients, DPParty, private_clients, private_party
from defenses.gradients import GRADIENT_DEFENSES, GradientNoise, GradientPruning, GradientQuantization
from defenses.homomorphic import CKKSClient, CKKSParameters, CKKSServer, KeyHolder
from defenses.homomorphic_aggregation import HomomorphicAggregation
from defenses.labels import IsotropicNoise, Marvell, MaxNorm
from defenses.nopeek import NoPeek, NoPeekLoss
from defenses.secagg import FixedPoint, KeyPair, expand, masked_input, reconstruct, share
from defenses.secure_aggregation import SecAggPlus, SecureAggregation
from defenses.side_channels import Shuffled
from defenses.splitguard import SplitGuard, guarded_split_training
from defenses.splintering import Splinter, inner_products, outsource, splintered, span_attack
from defenses.splintering_split import SplinteredLayer, first_linear

__all__ = [
    "ACTIVATION_DEFENSES", "Clip", "CutDropout", "GaussianNoise", "LaplaceNoise", "Quantize",
    "DPSGD", "make_private", "DPParty", "private_party", "DPClients", "private_clients", "GaussianMechanism", "DPFedAvg",
    "GRADIENT_DEFENSES", "GradientNoise", "GradientPruning", "GradientQuantization",
    "IsotropicNoise", "Marvell", "MaxNorm",
    "NoPeek", "NoPeekLoss",
    "SplitGuard", "guarded_split_training",
    "Opening", "check_openings", "commit", "verify",
    "CKKSClient", "CKKSParameters", "CKKSServer", "KeyHolder", "HomomorphicAggregation",
    "DPAggregation", "Cohorts", "Shuffled",
    "FixedPoint", "KeyPair", "expand", "masked_input", "reconstruct", "share", "SecureAggregation", "SecAggPlus",
    "Splinter", "inner_products", "outsource", "splintered", "span_attack", "SplinteredLayer", "first_linear",
]
from defenses.explorer import EXPLORER_DEFENSES  # noqa: E402  (the leakage explorer's registry)
__all__ += ["EXPLORER_DEFENSES"]
