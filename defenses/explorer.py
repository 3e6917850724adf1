"""The leakage explorer's defenses (``toolkit.widgets.LeakageExplorer(defenses=EXPLORER_DEFENSES)``):
each a factory ``(strength, generator)`` with its strength's range.

* none;
* Gaussian noise on the cut-layer activations, strength = sigma (He, Zhang, Lee, 2020);
* cut-layer dropout, strength = drop rate (He, Zhang, Lee, 2020);
* NoPeek, strength = alpha, the weight of dCor(X, Z) in the client's loss (Vepakomma et al., 2020).
"""
from __future__ import annotations

from defenses.activations import CutDropout, GaussianNoise
from defenses.nopeek import NoPeek
from toolkit.widgets.session import DefenseOption

__all__ = ["EXPLORER_DEFENSES"]

EXPLORER_DEFENSES: dict[str, DefenseOption] = {
    "none": DefenseOption(lambda s, g: None, 0.0, 0.0, 0.0, "strength (none)"),
    "Gaussian noise": DefenseOption(lambda s, g: GaussianNoise(s, generator=g), 0.0, 3.0, 0.5, "sigma"),
    "cut dropout": DefenseOption(lambda s, g: CutDropout(s, generator=g), 0.0, 0.95, 0.5, "rate"),
    "NoPeek": DefenseOption(lambda s, g: NoPeek(s), 0.0, 10.0, 3.0, "alpha"),
}
