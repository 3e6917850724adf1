"""Paper figures reproduced with presets (issue 14): one dataclass per figure, a ``smoke()``
preset, ``run()`` to a tidy DataFrame and ``plot(frame)`` beside the published values.

``python -m toolkit.figures`` (``make figures``) regenerates every figure into reports/figures/
with an index page; ``FIGURES`` maps each figure's name to its preset class.
"""
from toolkit.figures.base import Figure, crossover
from toolkit.figures.communication import SinghCommunication
from toolkit.figures.health import SplitHealth
from toolkit.figures.ring import RingLoan

FIGURES: dict[str, type[Figure]] = {cls.name: cls for cls in (SinghCommunication, SplitHealth, RingLoan)}

__all__ = ["FIGURES", "Figure", "RingLoan", "SinghCommunication", "SplitHealth", "crossover"]
