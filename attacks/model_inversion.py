"""Model inversion of cut-layer activations, in the three threat models of He, Zhang, Lee,
"Model inversion attacks against collaborative inference" (ACSAC 2019).

The attacker is the server; it reads the activations it received (``wire.observed(by="server",
kind="activations")``, e.g. the test-time ones, ``phase="eval"``) and, depending on what it knows:

* :class:`WhiteBoxInversion`: the client part itself (weights too): regularized maximum
  likelihood, ``min_x ||f(x) - z||^2 + lambda TV(x)``;
* :class:`InverseNetwork`: only query access to the client part: it trains a decoder from
  activations to inputs on auxiliary queries (same-distribution data, or random noise);
* :class:`QueryFree`: neither weights nor queries, only the client part's architecture and its
  own (server) part: it trains a shadow client part under its server part on auxiliary labelled
  data, then inverts through the shadow.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import (Attack, AttackResult, non_negative, positive, positive_int, select, stack, steps_for,
                          total_variation)
from toolkit.progress import progress
from toolkit.wire import Transfer


def _image_shape(input_shape: Sequence[int], attack: str) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1:
        raise ValueError(f"{attack} reconstructs images: input_shape must be (C, H, W) with 1 or 3 channels, "
                         f"got {tuple(input_shape)}")
    return shape


def _frozen(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def invert(model: nn.Module, z: Tensor, input_shape: tuple[int, ...], *, steps: int, lr: float, tv_weight: float,
           show_progress: bool = False, desc: str = "inversion") -> tuple[Tensor, list[float]]:
    """Regularized maximum likelihood: ``min_x sum ||model(x) - z||^2 + tv_weight TV(x)`` over images
    in [0, 1], every sample at once: Adam steps projected back onto the box. Returns (x, objective
    per step); on KeyboardInterrupt, the best so far."""
    x = torch.full((len(z), *input_shape), 0.5, requires_grad=True)
    opt = torch.optim.Adam([x], lr=lr)
    history: list[float] = []
    best, best_loss = x.detach().clone(), float("inf")
    try:
        for _ in progress(range(steps), show=show_progress, desc=desc):
            loss = ((model(x) - z) ** 2).sum() + tv_weight * total_variation(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(0, 1)
            value = loss.item() / len(z)
            history.append(value)
            if value < best_loss:
                best, best_loss = x.detach().clone(), value
    except KeyboardInterrupt:
        pass
    return best, history


class WhiteBoxInversion(Attack):
    """Regularized maximum-likelihood inversion through the known client part (He et al., 2019).

    Args:
        client_part: the client's model part, weights included (white-box).
        input_shape: shape of one input image (C, H, W), pixels in [0, 1].
        steps, lr: Adam iterations and step size on the image parameters.
        tv_weight: weight of the total-variation prior.

    Example:
        >>> from toolkit import models
        >>> part = models.cut(models.lenet(), at="conv1")[0]
        >>> attack = WhiteBoxInversion(part, input_shape=(1, 28, 28), steps=5)
        >>> z = part(torch.rand(2, 1, 28, 28)).detach()
        >>> from toolkit.wire import Transfer
        >>> attack.run([Transfer(1, "client", "server", "activations", z)]).reconstruction.shape
        torch.Size([2, 1, 28, 28])
    """

    threat_model = "honest-but-curious server that knows the client part, weights included (white-box)"

    def __init__(self, client_part: nn.Module, *, input_shape: Sequence[int], steps: int = 1000, lr: float = 0.1,
                 tv_weight: float = 0.01):
        self.client_part = client_part
        self.input_shape = _image_shape(input_shape, type(self).__name__)
        self.steps = positive_int("steps", steps)
        self.lr = positive("lr", lr)
        self.tv_weight = non_negative("tv_weight", tv_weight)

    def run(self, observed: Sequence[Transfer], *, show_progress: bool = False,
            generator: torch.Generator | None = None, max_steps: int | None = None) -> AttackResult:
        z = stack(select(observed, "activations", type(self).__name__))
        model = _frozen(_copy(self.client_part))
        x, history = invert(model, z, self.input_shape, steps=steps_for(self.steps, max_steps), lr=self.lr,
                            tv_weight=self.tv_weight, show_progress=show_progress, desc="white-box inversion")
        return AttackResult(type(self).__name__, reconstruction=x, history=history, config=self.config())


def _copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


def make_decoder(z_shape: Sequence[int], input_shape: Sequence[int], *, width: int = 32, hidden: int = 512) -> nn.Module:
    """A decoder from activations to images, sigmoid output. Feature maps with at least half the
    input's resolution get a convolutional decoder (upsample to the image size, two 3x3 convs);
    coarser maps and vectors get an MLP with one hidden layer. On the MNIST LeNet the conv decoder
    is far better at conv1/pool1 (SSIM 0.94 vs 0.40) and the MLP from conv2 on (0.86 vs 0.44)."""
    c, h, w = input_shape
    if len(z_shape) == 3 and z_shape[1] * z_shape[2] * 4 >= h * w:
        return nn.Sequential(
            nn.Upsample(size=(h, w), mode="bilinear", align_corners=False),
            nn.Conv2d(z_shape[0], width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, c, 3, padding=1), nn.Sigmoid())
    d = 1
    for s in z_shape:
        d *= int(s)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, c * h * w), nn.Sigmoid(),
                         nn.Unflatten(1, (c, h, w)))


class InverseNetwork(Attack):
    """Black-box inversion: learn a decoder from activations to inputs on auxiliary queries of the
    client part, then decode what the server observed (He et al., 2019).

    Args:
        query: the attacker's only access to the client part: a function inputs -> activations
            (a deployed client answering queries).
        aux: auxiliary inputs (N, C, H, W) in [0, 1] from the client's distribution, or the string
            ``"noise"`` for uniform random images (the attacker does not know the distribution).
        input_shape: shape of one input image.
        n_noise: how many random images to query with ``aux="noise"``.
        epochs, batch_size, lr: decoder training.
        decoder: a decoder module; default :func:`make_decoder` for the activation shape.
    """

    threat_model = "honest-but-curious server with query access to the client part (black-box)"

    def __init__(self, query: Callable[[Tensor], Tensor], *, aux: Tensor | str, input_shape: Sequence[int],
                 n_noise: int = 4000, epochs: int = 10, batch_size: int = 128, lr: float = 3e-3,
                 decoder: nn.Module | None = None):
        if not callable(query):
            raise ValueError(f"query must be a function inputs -> activations, got {query!r}")
        self.query = query
        self.input_shape = _image_shape(input_shape, type(self).__name__)
        if isinstance(aux, str):
            if aux != "noise":
                raise ValueError(f"aux must be a tensor of auxiliary inputs or 'noise', got {aux!r}")
        elif tuple(aux.shape[1:]) != self.input_shape:
            raise ValueError(f"auxiliary inputs have shape {tuple(aux.shape[1:])}, expected {self.input_shape}")
        self.aux = aux
        self.n_noise = positive_int("n_noise", n_noise)
        self.epochs = positive_int("epochs", epochs)
        self.batch_size = positive_int("batch_size", batch_size)
        self.lr = positive("lr", lr)
        self.decoder = decoder

    def config(self) -> dict:
        cfg = super().config()
        cfg["aux"] = "noise" if isinstance(self.aux, str) else f"{len(self.aux)} same-distribution inputs"
        cfg.pop("query", None)
        return cfg

    def run(self, observed: Sequence[Transfer], *, show_progress: bool = False,
            generator: torch.Generator | None = None, max_steps: int | None = None) -> AttackResult:
        z_obs = stack(select(observed, "activations", type(self).__name__))
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        aux = torch.rand(self.n_noise, *self.input_shape, generator=g) if isinstance(self.aux, str) else self.aux
        with torch.no_grad():
            z_aux = torch.cat([self.query(chunk).detach().float() for chunk in aux.split(1024)])
        if z_aux.shape[1:] != z_obs.shape[1:]:
            raise ValueError(f"queries answer activations of shape {tuple(z_aux.shape[1:])} but the transcript "
                             f"holds {tuple(z_obs.shape[1:])}")
        dims = [0] + list(range(2, z_aux.dim()))  # standardize per channel (maps) or unit (vectors), with the
        mean, std = z_aux.mean(dims, keepdim=True), z_aux.std(dims, keepdim=True) + 1e-6  # query statistics
        z_aux, z_obs = (z_aux - mean) / std, (z_obs - mean) / std  # unscaled conv outputs saturate the decoder
        decoder = self.decoder if self.decoder is not None else make_decoder(z_obs.shape[1:], self.input_shape)
        opt = torch.optim.Adam(decoder.parameters(), lr=self.lr)
        history: list[float] = []
        steps = steps_for(self.epochs * -(-len(aux) // self.batch_size), max_steps)
        decoder.train()
        try:
            for step in progress(range(steps), show=show_progress, desc="inverse network"):
                if step % -(-len(aux) // self.batch_size) == 0:
                    order = torch.randperm(len(aux), generator=g).split(self.batch_size)
                idx = order[step % len(order)]
                loss = F.mse_loss(decoder(z_aux[idx]), aux[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                history.append(loss.item())
        except KeyboardInterrupt:
            pass
        decoder.eval()
        with torch.no_grad():
            x = torch.cat([decoder(chunk) for chunk in z_obs.split(1024)])
        return AttackResult(type(self).__name__, reconstruction=x, history=history, config=self.config(),
                            extras={"decoder": decoder})


class QueryFree(Attack):
    """Query-free inversion: train a shadow client part under the attacker's own server part on
    auxiliary labelled data, then invert the observed activations through the shadow by
    regularized maximum likelihood (He et al., 2019).

    Args:
        architecture: builds an untrained client part of the victim's architecture (the attacker
            never sees the victim's weights).
        server_part: the attacker's own part of the network (it is the server).
        aux, aux_labels: auxiliary labelled inputs from the client's distribution.
        input_shape: shape of one input image.
        train_server: also update the server part while training the shadow (default: keep the
            trained server part fixed, which pulls the shadow's features towards the victim's).
        epochs, batch_size, lr: shadow training; steps, inversion_lr, tv_weight: the inversion.
    """

    threat_model = ("honest-but-curious server that knows the client part's architecture (not its weights) and "
                    "holds auxiliary labelled data; no queries")

    def __init__(self, architecture: Callable[[], nn.Module], server_part: nn.Module, *, aux: Tensor,
                 aux_labels: Tensor, input_shape: Sequence[int], train_server: bool = False, epochs: int = 5,
                 batch_size: int = 64, lr: float = 1e-3, steps: int = 1000, inversion_lr: float = 0.1,
                 tv_weight: float = 0.01):
        if not callable(architecture):
            raise ValueError(f"architecture must build a client part, got {architecture!r}")
        self.architecture, self.server_part = architecture, server_part
        self.input_shape = _image_shape(input_shape, type(self).__name__)
        if len(aux) != len(aux_labels) or tuple(aux.shape[1:]) != self.input_shape:
            raise ValueError(f"auxiliary data must be (N, {self.input_shape}) with N labels, got {tuple(aux.shape)} "
                             f"and {len(aux_labels)} labels")
        self.aux, self.aux_labels, self.train_server = aux, aux_labels, train_server
        self.epochs = positive_int("epochs", epochs)
        self.batch_size = positive_int("batch_size", batch_size)
        self.lr, self.inversion_lr = positive("lr", lr), positive("inversion_lr", inversion_lr)
        self.steps = positive_int("steps", steps)
        self.tv_weight = non_negative("tv_weight", tv_weight)

    def config(self) -> dict:
        cfg = super().config()
        for key in ("architecture", "aux", "aux_labels"):
            cfg.pop(key, None)
        cfg["aux"] = f"{len(self.aux)} labelled inputs"
        return cfg

    def run(self, observed: Sequence[Transfer], *, show_progress: bool = False,
            generator: torch.Generator | None = None, max_steps: int | None = None) -> AttackResult:
        z = stack(select(observed, "activations", type(self).__name__))
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        shadow = self.architecture()
        with torch.no_grad():
            out_shape = tuple(shadow(self.aux[:2]).shape[1:])
        if out_shape != tuple(z.shape[1:]):
            raise ValueError(f"the shadow outputs {out_shape} per sample but the transcript holds "
                             f"{tuple(z.shape[1:])}: wrong architecture?")
        server = _copy(self.server_part)
        params = list(shadow.parameters()) + (list(server.parameters()) if self.train_server else [])
        if not self.train_server:
            _frozen(server)
        opt = torch.optim.Adam(params, lr=self.lr)
        per_epoch = -(-len(self.aux) // self.batch_size)
        steps = steps_for(self.epochs * per_epoch, max_steps)
        shadow_loss: list[float] = []
        for step in progress(range(steps), show=show_progress, desc="shadow training"):
            if step % per_epoch == 0:
                order = torch.randperm(len(self.aux), generator=g).split(self.batch_size)
            idx = order[step % per_epoch]
            loss = F.cross_entropy(server(shadow(self.aux[idx])), self.aux_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            shadow_loss.append(loss.item())
        x, history = invert(_frozen(shadow), z, self.input_shape, steps=steps_for(self.steps, max_steps),
                            lr=self.inversion_lr, tv_weight=self.tv_weight, show_progress=show_progress,
                            desc="inversion through the shadow")
        return AttackResult(type(self).__name__, reconstruction=x, history=history, config=self.config(),
                            extras={"shadow": shadow, "shadow_loss": shadow_loss})
