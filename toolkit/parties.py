"""Party: a name, the model parts it holds, its private data, and its own optimizer."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

import torch
from torch import Tensor, nn

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


def make_optimizer(name: str = "sgd", **kwargs) -> OptimizerFactory:
    """An optimizer factory from a registry name (``"sgd"``, ``"adam"``, ``"adamw"``) and kwargs."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    return partial(OPTIMIZERS[name], **kwargs)


class Party:
    """One participant (a hospital, a server, a peer).

    A party holds model parts, private tensors in ``data`` (inputs, labels, ...), and one
    optimizer over all the parameters it holds. Parties never touch each other's tensors:
    protocols move tensors between them only through a :class:`toolkit.wire.Wire`.

    Args:
        name: unique name on the wire, e.g. ``"client"``, ``"server"``, ``"client:3"``.
        optimizer: factory ``params -> torch.optim.Optimizer`` (see :func:`make_optimizer`).
        data: private named tensors, e.g. ``{"x": inputs, "y": labels}``.

    Example:
        >>> p = Party("client", optimizer=make_optimizer("sgd", lr=0.1))
        >>> _ = p.hold(nn.Linear(4, 2))
        >>> p
        Party('client', holds 1 model part (10 parameters))
    """

    def __init__(self, name: str, *, optimizer: OptimizerFactory | None = None,
                 data: dict[str, Tensor] | None = None):
        if not isinstance(name, str) or not name:
            raise ValueError(f"a party needs a non-empty name, got {name!r}")
        self.name = name
        self.modules: list[nn.Module] = []
        self.data: dict[str, Tensor] = dict(data or {})
        self._make_optimizer = optimizer if optimizer is not None else make_optimizer("sgd", lr=0.1)
        self._optimizer: torch.optim.Optimizer | None = None
        self._wrap: Callable[[torch.optim.Optimizer], torch.optim.Optimizer] | None = None

    def hold(self, module: nn.Module) -> nn.Module:
        """Give this party a model part; its parameters join the party's optimizer."""
        if not isinstance(module, nn.Module):
            raise TypeError(f"party {self.name!r} can only hold nn.Module parts, got {type(module)}")
        if not any(module is m for m in self.modules):
            self.modules.append(module)
            self._optimizer = None  # rebuilt over all parameters on next use
        return module

    def parameters(self) -> list[nn.Parameter]:
        seen: set[int] = set()
        params = []
        for m in self.modules:
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The party's optimizer over every parameter it holds (None if it holds none)."""
        if self._optimizer is None:
            params = self.parameters()
            if params:
                self._optimizer = self._make_optimizer(params)
                if self._wrap is not None:
                    self._optimizer = self._wrap(self._optimizer)
        return self._optimizer

    def wrap_optimizer(self, wrap: Callable[[torch.optim.Optimizer], torch.optim.Optimizer]) -> None:
        """From now on the party steps ``wrap(its optimizer)`` (e.g. Opacus's DPOptimizer, which
        clips and noises per-sample gradients); the optimizer it already has is wrapped in place
        (its state kept), and one rebuilt after :meth:`hold` is wrapped too."""
        if not callable(wrap):
            raise TypeError(f"wrap must be a callable optimizer -> optimizer, got {wrap!r}")
        self._wrap = wrap
        if self._optimizer is not None:
            self._optimizer = wrap(self._optimizer)

    def zero_grad(self) -> None:
        opt = self.optimizer
        if opt is not None:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        opt = self.optimizer
        if opt is not None:
            opt.step()

    def train(self, mode: bool = True) -> None:
        for m in self.modules:
            m.train(mode)

    def __repr__(self) -> str:
        n_params = sum(p.numel() for p in self.parameters())
        parts = f"{len(self.modules)} model part{'s' if len(self.modules) != 1 else ''}"
        held = [f"{parts} ({n_params:,} parameters)"] if self.modules else []
        held += [f"{k} {tuple(v.shape)}" for k, v in self.data.items()]
        return f"Party({self.name!r}, holds {', '.join(held) if held else 'nothing'})"


def flat_state(module: nn.Module) -> Tensor:
    """All floating parameters and buffers of ``module`` as one 1-D tensor (for weight hand-off)."""
    tensors = [t.detach().reshape(-1) for t in _state_tensors(module)]
    return torch.cat(tensors) if tensors else torch.zeros(0)


def load_flat_state(module: nn.Module, flat: Tensor) -> None:
    """Inverse of :func:`flat_state`: copy ``flat`` into ``module``'s parameters and buffers."""
    tensors = _state_tensors(module)
    expected = sum(t.numel() for t in tensors)
    if flat.dim() != 1 or flat.numel() != expected:
        raise ValueError(f"weights of shape {tuple(flat.shape)} do not fit this model part, "
                         f"which has {expected} values")
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def _state_tensors(module: nn.Module) -> list[Tensor]:
    return [t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()]
