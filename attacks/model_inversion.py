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

Each checks, at the start of ``run``, that the activations it reads fit the client part (or the
queries' answers, or the shadow) it was given: same shape per sample, floating point, finite.
The decoder and the shadow are initialized from the ``generator`` passed to ``run``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import (Attack, AttackResult, check_generator, expect_shape, non_negative, positive, positive_int,
                          seeded, select, stack, steps_for, total_variation)
from toolkit.progress import progress
from toolkit.validate import finite
from toolkit.validate import labels as check_labels
from toolkit.validate import tensor as check_tensor
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


def _images(x, name: str, input_shape: tuple[int, ...]) -> Tensor:
    """``x`` if it is a finite floating-point batch of images of ``input_shape``; a ValueError otherwise."""
    x = check_tensor(x, name, min_dim=1)
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating-point images, got {x.dtype}")
    expect_shape(x.shape[1:], input_shape, name, "input_shape is")
    return finite(x, name)


def _output_shape(module: nn.Module, input_shape: tuple[int, ...], what: str) -> tuple[int, ...]:
    """The per-sample output shape of ``module`` (in eval mode, on a copy) for one input of ``input_shape``."""
    probe = _frozen(_copy(module))
    try:
        with torch.no_grad():
            return tuple(probe(torch.zeros(1, *input_shape)).shape[1:])
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"{what} does not take inputs of shape {input_shape}: {err}") from None


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
        client_part: the client's model part, weights included (white-box; read when ``run`` is
            called, on a copy).
        input_shape: shape of one input image (C, H, W), pixels in [0, 1].
        steps, lr: Adam iterations and step size on the image parameters.
        tv_weight: weight of the total-variation prior.

    Deterministic (every image starts at 0.5): ``generator`` is not used.

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
        name = type(self).__name__
        check_generator(generator)
        z = stack(select(observed, "activations", name), name)
        expect_shape(z.shape[1:], _output_shape(self.client_part, self.input_shape, f"{name}: the client part"),
                     f"{name}: the observed activations", f"the client part maps input_shape {self.input_shape} to")
        model = _frozen(_copy(self.client_part))
        x, history = invert(model, z, self.input_shape, steps=steps_for(self.steps, max_steps), lr=self.lr,
                            tv_weight=self.tv_weight, show_progress=show_progress, desc="white-box inversion")
        return AttackResult(type(self).__name__, reconstruction=x, history=history, config=self.config())


def _copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


def make_decoder(z_shape: Sequence[int], input_shape: Sequence[int], *, width: int = 32, hidden: int = 512,
                 kind: str | None = None) -> nn.Module:
    """A decoder from activations to images, sigmoid output: ``kind="conv"`` (upsample to the image
    size, two 3x3 convs; feature maps only) or ``"mlp"`` (one hidden layer). By default feature
    maps with at least half the input's resolution get the conv decoder, coarser maps and vectors
    the MLP: on the digits LeNet (28x28, 800 same-distribution queries, 8 epochs) the conv decoder
    is the better one at conv1 (SSIM about 0.79 vs 0.72) and the MLP at conv2 (about 0.83 vs 0.55).
    """
    if kind not in (None, "conv", "mlp"):
        raise ValueError(f"kind must be 'conv', 'mlp' or None (by resolution), got {kind!r}")
    c, h, w = input_shape
    if kind == "conv" and len(z_shape) != 3:
        raise ValueError(f"a conv decoder needs feature maps (C, H, W), got activations of shape {tuple(z_shape)}")
    if kind is None:
        kind = "conv" if len(z_shape) == 3 and z_shape[1] * z_shape[2] * 4 >= h * w else "mlp"
    if kind == "conv":
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
        n_noise: how many random images to query with ``aux="noise"`` (drawn from ``generator``).
        epochs, batch_size, lr: decoder training.
        decoder: a decoder module (trained on a copy, so every run starts from it); default
            :func:`make_decoder` for the activation shape, initialized from ``generator``.
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
        else:
            aux = _images(aux, "auxiliary inputs", self.input_shape)
        self.aux = aux
        self.n_noise = positive_int("n_noise", n_noise)
        self.epochs = positive_int("epochs", epochs)
        self.batch_size = positive_int("batch_size", batch_size)
        self.lr = positive("lr", lr)
        if decoder is not None and not isinstance(decoder, nn.Module):
            raise ValueError(f"decoder must be an nn.Module, got {type(decoder).__name__}")
        self.decoder = decoder

    def config(self) -> dict:
        cfg = super().config()
        cfg["aux"] = "noise" if isinstance(self.aux, str) else f"{len(self.aux)} same-distribution inputs"
        cfg.pop("query", None)
        return cfg

    def run(self, observed: Sequence[Transfer], *, show_progress: bool = False,
            generator: torch.Generator | None = None, max_steps: int | None = None) -> AttackResult:
        name = type(self).__name__
        g = check_generator(generator)
        z_obs = stack(select(observed, "activations", name), name)
        aux = torch.rand(self.n_noise, *self.input_shape, generator=g) if isinstance(self.aux, str) else self.aux
        with torch.no_grad():
            z_aux = torch.cat([self.query(chunk).detach().float() for chunk in aux.split(1024)])
        if z_aux.shape[1:] != z_obs.shape[1:]:
            raise ValueError(f"queries answer activations of shape {tuple(z_aux.shape[1:])} but the transcript "
                             f"holds {tuple(z_obs.shape[1:])}")
        finite(z_aux, f"{name}: the queries' answers")
        dims = [0] + list(range(2, z_aux.dim()))  # standardize per channel (maps) or unit (vectors), with the
        mean, std = z_aux.mean(dims, keepdim=True), z_aux.std(dims, keepdim=True) + 1e-6  # query statistics
        z_aux, z_obs = (z_aux - mean) / std, (z_obs - mean) / std  # unscaled conv outputs saturate the decoder
        with seeded(g):
            decoder = _copy(self.decoder) if self.decoder is not None else make_decoder(z_obs.shape[1:],
                                                                                       self.input_shape)
        with torch.no_grad():
            out = tuple(decoder.eval()(z_obs[:1]).shape[1:])
        expect_shape(out, self.input_shape, f"{name}: the decoder's output", "input_shape is")
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
            never sees the victim's weights); called in ``run``, initialized from ``generator``.
        server_part: the attacker's own part of the network (it is the server; trained on a copy).
        aux, aux_labels: auxiliary labelled inputs from the client's distribution.
        input_shape: shape of one input image.
        train_server: also update the server part while training the shadow (default: keep the
            trained server part fixed, which pulls the shadow's features towards the victim's).
        epochs, batch_size, lr: shadow training; steps, inversion_lr, tv_weight: the inversion.
    """

    threat_model = ("honest-but-curious server that knows the client part's architecture (not its weights), "
                    "holds its own server part and auxiliary labelled data; no queries")

    def __init__(self, architecture: Callable[[], nn.Module], server_part: nn.Module, *, aux: Tensor,
                 aux_labels: Tensor, input_shape: Sequence[int], train_server: bool = False, epochs: int = 5,
                 batch_size: int = 64, lr: float = 1e-3, steps: int = 1000, inversion_lr: float = 0.1,
                 tv_weight: float = 0.01):
        if not callable(architecture):
            raise ValueError(f"architecture must build a client part, got {architecture!r}")
        if not isinstance(server_part, nn.Module):
            raise ValueError(f"server_part must be an nn.Module, got {type(server_part).__name__}")
        self.architecture, self.server_part = architecture, server_part
        self.input_shape = _image_shape(input_shape, type(self).__name__)
        aux = _images(aux, "auxiliary inputs", self.input_shape)
        aux_labels = check_labels(aux_labels, "auxiliary labels", length=len(aux))
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
        name = type(self).__name__
        g = check_generator(generator)
        z = stack(select(observed, "activations", name), name)
        with seeded(g):
            shadow = self.architecture()
        if not isinstance(shadow, nn.Module):
            raise ValueError(f"architecture must return an nn.Module, got {type(shadow).__name__}")
        server = _copy(self.server_part)
        with torch.no_grad():
            out_shape = tuple(shadow(self.aux[:2]).shape[1:])
            if out_shape != tuple(z.shape[1:]):
                raise ValueError(f"the shadow outputs {out_shape} per sample but the transcript holds "
                                 f"{tuple(z.shape[1:])}: wrong architecture?")
            was = server.training
            try:
                scores = server.eval()(shadow(self.aux[:2]))
            except (RuntimeError, ValueError) as err:
                raise ValueError(f"{name}: the server part does not take the shadow's outputs {out_shape}: "
                                 f"{err}") from None
            finally:
                server.train(was)
        if scores.dim() != 2:
            raise ValueError(f"{name}: the server part must output (N, classes) scores, got {tuple(scores.shape)}")
        check_labels(self.aux_labels, "auxiliary labels", n_classes=scores.shape[1])
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
