"""The leakage explorer's attacks (``toolkit.widgets.LeakageExplorer(attacks=EXPLORER_ATTACKS)``):
each ``fn(target, generator) -> reconstruction`` of the attacked inputs, from what the server
received (``target.observed``) and what its threat model grants (He, Zhang, Lee, "Model inversion
attacks against collaborative inference", ACSAC 2019):

* white-box inversion: the client part's weights (:class:`~attacks.model_inversion.WhiteBoxInversion`);
* inverse network: query access to the client part and same-distribution inputs
  (:class:`~attacks.model_inversion.InverseNetwork`).

Both reconstruct images in [0, 1]. On tabular data (standardized features) they work on the
features rescaled to [0, 1] within the range of the auxiliary inputs (the attacker is assumed to
know each feature's range), as a one-row "image", and map the result back to feature units.
Budgets are small so a click answers in seconds.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from attacks.model_inversion import InverseNetwork, WhiteBoxInversion

__all__ = ["EXPLORER_ATTACKS", "inverse_network", "white_box_inversion"]


class _FromBox(nn.Module):
    """(B, 1, 1, F) in [0, 1] -> (B, F) features in [low, high]."""

    def __init__(self, low: Tensor, high: Tensor):
        super().__init__()
        self.register_buffer("low", low)
        self.register_buffer("span", (high - low).clamp(min=1e-6))

    def forward(self, u: Tensor) -> Tensor:
        return self.low + self.span * u.flatten(1)


def _space(target):
    """(the client as the attacker sees it, input shape, inputs -> attack space, attack space -> inputs)."""
    if target.is_image:
        return target.client, target.input_shape, (lambda x: x), (lambda u: u)
    box = _FromBox(target.aux.amin(0), target.aux.amax(0))
    n = target.input_shape[0]
    to_box = lambda x: ((x - box.low) / box.span).clamp(0, 1).reshape(len(x), 1, 1, n)  # noqa: E731
    return nn.Sequential(box, target.client), (1, 1, n), to_box, (lambda u: box(u).detach())


def white_box_inversion(target, generator: torch.Generator, *, steps: int = 300) -> Tensor:
    """Regularized maximum likelihood through the known client part (TV prior on images only)."""
    client, shape, _, back = _space(target)
    attack = WhiteBoxInversion(client, input_shape=shape, steps=steps, lr=0.05,
                               tv_weight=0.01 if target.is_image else 0.0)
    return back(attack.run(target.observed, generator=generator).reconstruction)


def inverse_network(target, generator: torch.Generator, *, epochs: int = 10) -> Tensor:
    """A decoder trained on queries of the client part with the auxiliary (training) inputs."""
    client, shape, to_space, back = _space(target)
    aux = to_space(target.aux)

    def query(x: Tensor) -> Tensor:
        with torch.no_grad():
            return client(x)

    attack = InverseNetwork(query, aux=aux, input_shape=shape, epochs=epochs)
    return back(attack.run(target.observed, generator=generator).reconstruction)


EXPLORER_ATTACKS = {"white-box inversion": white_box_inversion, "inverse network": inverse_network}
