"""LeakLab's toolkit: the Wire, parties, data, models, split and federated protocols, metrics, plots.

Everything that crosses a party boundary goes through a :class:`Wire`, which counts and records
it; attacks read only ``wire.observed(by=...)``.
"""
from toolkit.seeding import seed_everything
from toolkit.wire import InProcess, Transfer, Wire
from toolkit.parties import Party, make_optimizer
from toolkit import audit, data, metrics, models, plots, split  # noqa: E402  (after the core)

__version__ = "0.1.0"

__all__ = ["InProcess", "audit", "Party", "Transfer", "Wire", "data", "make_optimizer", "metrics", "models",
           "plots", "seed_everything", "split", "__version__"]
