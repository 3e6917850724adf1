"""LeakageProbe: a split-learning hook that logs, while training runs, how much a client part's
outputs still say about fixed probe inputs (a ``dcor`` column of the fit history).

The statistic is the sample distance correlation of Székely, Rizzo, Bakirov, "Measuring and
testing dependence by correlation of distances" (2007), between the probe inputs and the
client part's cut-layer outputs on them: the leakage measure of NoPeek (Vepakomma et al.,
"NoPeek: Information leakage reduction to share activations in distributed deep learning",
2020), here scored on the same held-out inputs at every point, so the values of a run can be
compared with each other (NoPeek's own column is the batch's value, a different batch each step).
With ``unbiased=True`` the column holds the bias-corrected squared statistic (Székely & Rizzo,
2013), which stays near 0 for independent data when the dimension exceeds the number of probes.

The probe is the experimenter's instrument, not a party's action: it runs the client part
outside the Wire (nothing is sent or recorded), under ``torch.no_grad`` and in eval mode
(dropout off, batch-norm statistics untouched; each submodule's mode is restored afterwards),
and draws nothing at random, so a probed run trains exactly as an unprobed one.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from toolkit import validate
from toolkit.dependence import distance_correlation_chunked, u_distance_correlation_sqr_chunked
from toolkit.parties import Party
from toolkit.split.hooks import Hook

__all__ = ["LeakageProbe"]


class LeakageProbe(Hook):
    """Log ``dCor(probe inputs, client part(probe inputs))`` in the fit history while training.

    Register it for the first-stage party whose part it measures (``hooks={"client": probe}``;
    combine it with that party's other hooks through :class:`toolkit.split.Hooks`). After the
    optimizer step of every ``every``-th step of its party, and of the last step of each epoch,
    it runs the part on the probe inputs and records the value under ``column``; other rows of
    that column are NaN.

    The part is ``part`` when given (a U-shaped client holds two parts: pass the first), else the
    one model part the party holds (the party arrives through :meth:`Hook.check`). The end of an
    epoch is found by counting the party's training samples (from :meth:`Hook.loss`, which adds
    nothing) against ``len(party.data[data_key])``: it assumes whole passes, so after a run that
    stopped mid-epoch (``fit(steps=...)``) the epoch-end points shift; the every-``every`` points
    do not.

    Args:
        inputs: (n, ...) fixed probe inputs, e.g. held-out test images; n >= 2 (>= 4 unbiased).
        part: the client's model part (nn.Module), or None for the party's only part.
        every: record every this many steps of the party (counting from its first step).
        unbiased: record the bias-corrected squared distance correlation instead of dCor.
        column: the history column.
        data_key: the party's training-input key (its epoch length).

    Example:
        >>> from toolkit import data, models
        >>> from toolkit.split import SplitNN
        >>> ds = data.load("digits").subset(range(256))
        >>> client, server = models.cut(models.mlp([64, 32, 10]), at=2)
        >>> probe = LeakageProbe(ds.x_test[:100], client, every=3)
        >>> history = SplitNN.vanilla(client, server, ds, hooks={"client": probe}).fit(epochs=1)
        >>> history["dcor"].notna().tolist()  # steps 3 and the epoch's last, 4
        [False, False, True, True]
    """

    def __init__(self, inputs: Tensor, part: nn.Module | None = None, *, every: int = 10,
                 unbiased: bool = False, column: str = "dcor", data_key: str = "x"):
        inputs = validate.finite(validate.tensor(inputs, "probe inputs", min_dim=1), "probe inputs",
                                 hint="probe with clean inputs")
        self.unbiased = validate.boolean("unbiased", unbiased)
        least = 4 if self.unbiased else 2
        if len(inputs) < least:
            raise ValueError(f"probe inputs must hold at least {least} samples"
                             f"{' for the bias-corrected statistic' if self.unbiased else ''}, got {len(inputs)}")
        if not inputs.is_floating_point():
            raise ValueError(f"probe inputs must be floating point (a model part's inputs), got {inputs.dtype}")
        if part is not None and not isinstance(part, nn.Module):
            raise ValueError(f"part must be the client's nn.Module (or None), got {type(part).__name__}")
        for name, value in (("column", column), ("data_key", data_key)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        self.inputs = inputs.detach()
        self.part = part
        self.every = validate.positive_int("every", every)
        self.column, self.data_key = column, data_key
        self.party: Party | None = None
        self.values: dict[int, float] = {}  # step -> recorded statistic
        self._seen = 0           # training samples of the current epoch so far
        self._steps = 0          # steps of the party so far
        self._last = False       # whether the current step ends an epoch
        if part is not None:
            self.measure()  # a probe that does not fit the part fails here, not mid-training

    # -- the hook ----------------------------------------------------------------------------
    def loss(self, step: int, inputs: Tensor, outputs: Tensor) -> None:
        self._seen += len(inputs)
        return None

    def check(self, step: int, party: Party, received: Sequence[Tensor]) -> bool:
        if self.party is None:
            self._bind(party)
        elif party is not self.party:
            raise ValueError(f"one LeakageProbe measures one party's part: it is registered for "
                             f"{self.party.name!r} and {party.name!r}; give each its own probe and column")
        n = len(party.data[self.data_key])
        self._last = self._seen >= n
        if self._last:
            self._seen = 0
        return True

    def record(self, step: int) -> dict[str, float]:
        if self.party is None:  # check() did not run: the hook's party is not a data holder here
            return {}
        self._steps += 1
        if self._steps % self.every and not self._last:
            return {self.column: math.nan}
        self.values[step] = value = self.measure()
        return {self.column: value}

    # -- the measurement ---------------------------------------------------------------------
    def measure(self) -> float:
        """The statistic now, on the probe inputs (no_grad, eval mode, modes restored)."""
        part = self._module()
        modes = [(m, m.training) for m in part.modules()]
        part.eval()
        try:
            with torch.no_grad():
                try:
                    z = part(self.inputs)  # (n, ...) cut-layer outputs on the probes
                except RuntimeError as err:
                    raise ValueError(f"the probe inputs {tuple(self.inputs.shape)} do not fit the client "
                                     f"part: {err}") from err
        finally:
            for m, mode in modes:
                m.training = mode
        if not isinstance(z, Tensor) or len(z) != len(self.inputs):
            raise ValueError("the client part must return one output row per probe input, got "
                             f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
        stat = u_distance_correlation_sqr_chunked if self.unbiased else distance_correlation_chunked
        return float(stat(self.inputs, z))

    def _module(self) -> nn.Module:
        if self.part is None:
            raise ValueError("the probe knows no model part yet: pass part=, or let it see its party train")
        return self.part

    def _bind(self, party: Party) -> None:
        if self.data_key not in party.data:
            raise ValueError(f"LeakageProbe is registered for {party.name!r}, which holds no training "
                             f"inputs {self.data_key!r} (it has {sorted(party.data)}): register it for a "
                             f"first-stage, data-holding party")
        if self.part is None:
            if len(party.modules) != 1:
                raise ValueError(f"{party.name!r} holds {len(party.modules)} model parts: pass the one to "
                                 f"probe as LeakageProbe(inputs, part=...)")
            self.part = party.modules[0]
            self.measure()
        elif not any(self.part is m for m in party.modules):
            raise ValueError(f"the part given to LeakageProbe is not one {party.name!r} holds")
        self.party = party

    def __repr__(self) -> str:
        return (f"LeakageProbe({len(self.inputs)} probe inputs, every={self.every}, "
                f"unbiased={self.unbiased}, column={self.column!r})")
