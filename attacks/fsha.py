"""Feature-space hijacking (FSHA): a malicious split-learning server steers the client's model
into a feature space it can invert.

Pasquini, Ateniese, Bernaschi, "Unleashing the tiger: inference attacks on split learning"
(CCS 2021; reference code pasquini-dario/SplitNN_FSHA). Instead of training the task, the server

1. trains a pilot encoder f~ and its decoder f~^-1 as an autoencoder on public data (same
   distribution as the client's, disjoint from it),
2. trains a critic D to tell the pilot's features f~(x_pub) from the client's smashed data
   f(x_priv) (WGAN with gradient penalty),
3. sends the client, in place of the task gradient, the gradient of the adversarial loss
   mean D(f(x_priv)) with respect to the smashed data it received.

The honest client backpropagates that gradient and steps its own optimizer, so f drifts into the
pilot's feature space, where f~^-1 inverts it: ``f~^-1(f(x_priv)) ~ x_priv``.

:meth:`FeatureSpaceHijacking.attack_training` simulates the run (client and malicious server,
everything between them through a :class:`toolkit.wire.Wire`); :meth:`FeatureSpaceHijacking.run`
then inverts the activations of any transcript with the trained decoder.

Settings. The paper's MNIST run uses WGAN-GP weight 500, Adam with lr_f = lr_f~ = 1e-5 and
lr_D = 1e-4, one critic step per batch, batch 64, 10k iterations. For 8x8 digits on a CPU in
seconds we keep the penalty weight 500 and Adam (betas 0.5, 0.9 for the server's networks) and
use lr_client = lr_pilot = 3e-3, lr_D = 1e-3, 3 critic steps per batch, batch 32, small networks
(``width=32``): on a convnet client cut before its second ReLU (``convnet(width=16)`` at
``"conv2"``) the private-batch MSE goes from 0.130 (mean of the first 50 steps) to below 0.05
at step 157 and to 0.035 (mean of steps 351-400), with SplitGuard acting for the client;
``tests/test_fsha.py`` asserts a first-50 mean above 0.08, a first crossing of 0.05 before step
200 and a last-50 mean below 0.04. As in the reference code the pilot is linear
(a target any client part can reach); when the smashed data the server receives is non-negative
(a client cut after a ReLU) the pilot ends with a ReLU, and the attack is much slower there:
the client's dead ReLU units get no gradient.

Example:
    >>> from toolkit import data, models
    >>> x = data.load("digits").x_train
    >>> client, _ = models.cut(models.convnet(width=8), at="conv2")
    >>> fsha = FeatureSpaceHijacking(steps=2, batch_size=8, critic_steps=1)  # a smoke run
    >>> result = fsha.attack_training(client, x[:200], x[200:400], generator=torch.Generator().manual_seed(0))
    >>> len(result.history), tuple(result.reconstruction.shape)
    (2, (8, 1, 8, 8))
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import (Attack, AttackResult, non_negative, positive, positive_int, seeded, select, stack,
                          steps_for)
from toolkit.metrics import mse
from toolkit.parties import Party
from toolkit.progress import progress
from toolkit.split import Hook, Pipeline, Segment, SplitConfig, SplitNN, Task
from toolkit.wire import Transfer, Wire

__all__ = ["FeatureSpaceHijacking", "pilot_encoder", "pilot_decoder", "critic"]


# -- architectures, built from the shapes the server knows -------------------------------------
def _image_shape(shape: Sequence[int], what: str) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"FSHA is an image attack: {what} must be images (C, H, W) per sample, got per-sample "
                         f"shape {shape}{' (tabular data?)' if len(shape) == 1 else ''}")
    return shape  # type: ignore[return-value]


def _z_kind(z_shape: Sequence[int]) -> str:
    if len(z_shape) == 1:
        return "flat"
    if len(z_shape) == 3:
        return "spatial"
    raise ValueError(f"FSHA handles smashed data of shape (D,) or (C, H, W) per sample, got {tuple(z_shape)}")


def pilot_encoder(image_shape: Sequence[int], z_shape: Sequence[int], *, width: int = 32,
                  nonnegative: bool = False) -> nn.Sequential:
    """The pilot f~: images (C, H, W) -> features of the client's output shape.

    Linear, as in the paper's reference code (its pilot has no activations): a target that any
    client part can reach. Spatial features (C', h, w): a 3x3 conv, stride-2 3x3 convs while the
    map can halve, adaptive average pooling to (h, w) when needed, a 3x3 conv to C' channels.
    Flat features (D,): one linear layer. ``nonnegative`` ends with a ReLU, for clients whose
    smashed data is post-ReLU (the server sees that in what it receives).
    """
    c, h, w = _image_shape(image_shape, "the inputs")
    if _z_kind(z_shape) == "flat":
        layers: list[nn.Module] = [nn.Flatten(), nn.Linear(c * h * w, int(z_shape[0]))]
    else:
        zc, zh, zw = (int(s) for s in z_shape)
        layers = [nn.Conv2d(c, width, 3, padding=1)]
        while h // 2 >= zh and w // 2 >= zw:
            layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
            h, w = (h + 1) // 2, (w + 1) // 2
        if (h, w) != (zh, zw):
            layers.append(nn.AdaptiveAvgPool2d((zh, zw)))
        layers.append(nn.Conv2d(width, zc, 3, padding=1))
    if nonnegative:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def pilot_decoder(z_shape: Sequence[int], image_shape: Sequence[int], *, width: int = 32,
                  output: str = "sigmoid") -> nn.Sequential:
    """The pilot's inverse f~^-1: features -> images (C, H, W), ending in ``output``
    (``"sigmoid"`` for pixels in [0, 1], ``"tanh"`` for [-1, 1], ``"none"``)."""
    c, h, w = _image_shape(image_shape, "the inputs")
    if _z_kind(z_shape) == "flat":
        layers: list[nn.Module] = [nn.Linear(int(z_shape[0]), 4 * width), nn.ReLU(),
                                   nn.Linear(4 * width, c * h * w), nn.Unflatten(1, (c, h, w))]
    else:
        zc, zh, zw = (int(s) for s in z_shape)
        layers = [nn.Conv2d(zc, width, 3, padding=1), nn.ReLU()]
        while zh * 2 <= h and zw * 2 <= w:
            layers += [nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.ReLU()]
            zh, zw = zh * 2, zw * 2
        if (zh, zw) != (h, w):
            layers.append(nn.Upsample(size=(h, w), mode="bilinear", align_corners=False))
        layers.append(nn.Conv2d(width, c, 3, padding=1))
    layers += {"sigmoid": [nn.Sigmoid()], "tanh": [nn.Tanh()], "none": []}[output]
    return nn.Sequential(*layers)


def critic(z_shape: Sequence[int], *, width: int = 32) -> nn.Sequential:
    """The WGAN critic D on smashed data (no batch norm, as the gradient penalty requires)."""
    if _z_kind(z_shape) == "flat":
        return nn.Sequential(nn.Linear(int(z_shape[0]), 4 * width), nn.LeakyReLU(0.2),
                             nn.Linear(4 * width, 4 * width), nn.LeakyReLU(0.2), nn.Linear(4 * width, 1))
    zc, zh, zw = (int(s) for s in z_shape)
    return nn.Sequential(nn.Conv2d(zc, width, 3, padding=1), nn.LeakyReLU(0.2),
                         nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
                         nn.Flatten(), nn.LazyLinear(1))


def _gradient_penalty(d: nn.Module, real: Tensor, fake: Tensor, generator: torch.Generator | None) -> Tensor:
    """Gulrajani et al., "Improved training of Wasserstein GANs" (2017): (||grad D(x_hat)|| - 1)^2."""
    eps = torch.rand((len(real),) + (1,) * (real.dim() - 1), generator=generator)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_()
    (grad,) = torch.autograd.grad(d(x_hat).sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def _images(x: Any, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor of images (N, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"FSHA is an image attack: {name} must be images (N, C, H, W), got shape "
                         f"{tuple(x.shape)}{' (tabular data?)' if x.dim() == 2 else ''}")
    if len(x) < 2:
        raise ValueError(f"{name} needs at least 2 samples, got {len(x)}")
    return x.float()


class FeatureSpaceHijacking(Attack):
    """Feature-space hijacking by a malicious split-learning server (Pasquini et al., CCS 2021).

    Args:
        pilot, decoder, discriminator: the server's networks; built at the first batch received,
            from the smashed data's shape (and sign) and the public images' shape, when None.
        width: channel width of the networks built automatically.
        lr_pilot: Adam learning rate of the pilot autoencoder (f~ and f~^-1).
        lr_discriminator: Adam learning rate of the critic D.
        lr_client: Adam learning rate of the simulated honest client (the paper's lr_f); ignored
            when ``attack_training`` gets a ``client_optimizer``.
        gp_weight: weight of the WGAN gradient penalty (500 in the paper).
        critic_steps: critic updates per received batch (1 in the paper; 3 converges in fewer
            client steps here).
        steps: training steps of :meth:`attack_training` (one client batch each).
        batch_size: client and public batch size.

    ``run(observed)`` inverts a transcript's activations with the trained decoder.
    """

    threat_model = ("malicious server: deviates from the protocol; has public data from the client's "
                    "distribution and the client part's output shape")
    needs = "activations"

    def __init__(self, *, pilot: nn.Module | None = None, decoder: nn.Module | None = None,
                 discriminator: nn.Module | None = None, width: int = 32, lr_pilot: float = 3e-3,
                 lr_discriminator: float = 1e-3, lr_client: float = 3e-3, gp_weight: float = 500.0,
                 critic_steps: int = 3, steps: int = 500, batch_size: int = 32):
        for name, module in (("pilot", pilot), ("decoder", decoder), ("discriminator", discriminator)):
            if module is not None and not isinstance(module, nn.Module):
                raise ValueError(f"{name} must be an nn.Module or None, got {type(module).__name__}")
        self.width = positive_int("width", width)
        self.lr_pilot = positive("lr_pilot", lr_pilot)
        self.lr_discriminator = positive("lr_discriminator", lr_discriminator)
        self.lr_client = positive("lr_client", lr_client)
        self.gp_weight = non_negative("gp_weight", gp_weight)
        self.steps = positive_int("steps", steps)
        self.batch_size = positive_int("batch_size", batch_size)
        self.critic_steps = positive_int("critic_steps", critic_steps)
        self._pilot, self._decoder, self._discriminator = pilot, decoder, discriminator
        self._z_shape: tuple[int, ...] | None = None  # per-sample smashed-data shape, once seen
        self._optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer] | None = None

    @property
    def decoder(self) -> nn.Module | None:
        """The pilot's inverse f~^-1 (None before training unless passed in)."""
        return self._decoder

    # -- the malicious server ------------------------------------------------------------
    def _build(self, z: Tensor, public_x: Tensor, generator: torch.Generator | None) -> None:
        """Build what is missing from what the server knows: the received shape and sign, the public images."""
        z_shape, image_shape = tuple(z.shape[1:]), tuple(public_x.shape[1:])
        self._z_shape = z_shape
        lo, hi = float(public_x.min()), float(public_x.max())
        output = "sigmoid" if lo >= 0 and hi <= 1 else "tanh" if lo >= -1 and hi <= 1 else "none"
        with seeded(generator):  # initialise from the generator, not the global RNG
            if self._pilot is None:
                self._pilot = pilot_encoder(image_shape, z_shape, width=self.width, nonnegative=bool(z.min() >= 0))
            if self._decoder is None:
                self._decoder = pilot_decoder(z_shape, image_shape, width=self.width, output=output)
            if self._discriminator is None:
                self._discriminator = critic(z_shape, width=self.width)
            self._discriminator(z[:1].detach())  # materialise lazy layers
        if self._optimizers is None:
            ae = list(self._pilot.parameters()) + list(self._decoder.parameters())
            self._optimizers = (torch.optim.Adam(ae, lr=self.lr_pilot, betas=(0.5, 0.9)),
                                torch.optim.Adam(self._discriminator.parameters(), lr=self.lr_discriminator,
                                                 betas=(0.5, 0.9)))

    def _server_step(self, z: Tensor, x_pub: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor, dict]:
        """One malicious-server step on what it received (``z``) and its own public batch.

        Returns the hijacking gradient to send back (d mean D(z) / dz), the server's reconstruction
        of the private batch (f~^-1(z)) and the losses. Ground truth never enters here.
        """
        pilot, dec, d = self._pilot, self._decoder, self._discriminator
        opt_ae, opt_d = self._optimizers
        z = z.detach().requires_grad_()                      # (B, ...) smashed data as received
        hijack = d(z).mean()                                 # low critic score = "looks like f~(x_pub)"
        (grad,) = torch.autograd.grad(hijack, z)             # sent instead of the task gradient
        z_pub = pilot(x_pub)                                 # autoencoder on public data
        ae_loss = F.mse_loss(dec(z_pub), x_pub)
        opt_ae.zero_grad(set_to_none=True)
        ae_loss.backward()
        opt_ae.step()
        z_priv, z_pub = z.detach(), z_pub.detach()           # critic: public low, private high
        for _ in range(self.critic_steps):
            d_loss = d(z_pub).mean() - d(z_priv).mean()
            if self.gp_weight > 0:
                d_loss = d_loss + self.gp_weight * _gradient_penalty(d, z_priv, z_pub, generator)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        with torch.no_grad():
            rec = dec(z_priv)                                # (B, C, H, W) the attacker's inversion
        return grad, rec, {"hijack_loss": float(hijack.detach()), "autoencoder_loss": float(ae_loss.detach()),
                           "discriminator_loss": float(d_loss.detach())}

    # -- the simulated run ---------------------------------------------------------------
    def attack_training(self, client_part: nn.Module, private_x: Tensor, public_x: Tensor, *,
                        steps: int | None = None, wire: Wire | None = None, batch_size: int | None = None,
                        generator: torch.Generator | None = None, detector: Hook | None = None,
                        private_y: Tensor | None = None, client_optimizer: torch.optim.Optimizer | None = None,
                        max_steps: int | None = None, show_progress: bool = False) -> AttackResult:
        """Simulate split training against this malicious server, on the one split training loop
        (:class:`toolkit.split.SplitNN` with this attack as the server's hook); everything crosses
        ``wire``, so a Wire defense applies here as it does to honest training.

        Each step the honest client encodes a private batch and sends it (``kind="activations"``;
        with ``private_y``, also its labels, which the server ignores); the server answers with the
        hijacking gradient (``kind="gradients"``); the client backpropagates it and steps its
        optimizer. A ``detector`` (e.g. :class:`defenses.splitguard.SplitGuard`) is the client's
        hook: it picks fake batches (randomized labels; the client does not step on them) and
        checks the gradient of the client's first layer.

        Args:
            client_part: the client's model part f (trained in place, as the client would).
            private_x: the client's images (N, C, H, W); never given to the server.
            public_x: the server's images from the same distribution (M, C, H, W).
            steps, batch_size: default to the constructor's.
            wire: the wire between client and server (a fresh one if None).
            generator: draws the client's data order, the server's network initialisation, its
                public batches and the gradient penalty.
            detector: a :class:`toolkit.split.Hook` acting for the client; needs ``private_y``.
            private_y: the client's labels (N,), sent as vanilla split learning does.
            client_optimizer: the client's optimizer over ``client_part`` (Adam(lr_client) if None).
            max_steps: caps ``steps`` (smoke runs).

        Returns:
            AttackResult: ``history`` is the reconstruction MSE per step, scored on the caller's
            side against the private batch; ``reconstruction`` the server's inversion of the last
            batch (rows ``extras["rows"]`` of ``private_x``); ``extras`` the GAN losses per step,
            wire ``steps``, ``fake`` flags, ``seconds`` and the detector's ``flagged_at``.
        """
        n_steps = steps_for(positive_int("steps", self.steps if steps is None else steps), max_steps)
        batch = positive_int("batch_size", self.batch_size if batch_size is None else batch_size)
        if not isinstance(client_part, nn.Module):
            raise ValueError(f"client_part must be an nn.Module, got {type(client_part).__name__}")
        private_x, public_x = _images(private_x, "private_x"), _images(public_x, "public_x")
        if private_x.shape[1:] != public_x.shape[1:]:
            raise ValueError(f"public images {tuple(public_x.shape[1:])} and private images "
                             f"{tuple(private_x.shape[1:])} differ in shape")
        if private_y is not None and (not isinstance(private_y, Tensor) or private_y.shape != (len(private_x),)):
            raise ValueError(f"private_y must hold one label per private image ({len(private_x)},), got "
                             f"{tuple(private_y.shape) if isinstance(private_y, Tensor) else type(private_y).__name__}")
        if detector is not None and private_y is None:
            raise ValueError("a fake-batch detector needs the client's labels: pass private_y")
        if detector is not None and not isinstance(detector, Hook):
            raise ValueError(f"detector must be a toolkit.split.Hook acting for the client (e.g. SplitGuard), "
                             f"got {type(detector).__name__}")
        wire = wire if wire is not None else Wire()
        batch = min(batch, len(private_x), len(public_x))
        params = [p for p in client_part.parameters() if p.requires_grad]
        if not params:
            raise ValueError("client_part has no trainable parameters: there is nothing to hijack")
        opt = client_optimizer if client_optimizer is not None else torch.optim.Adam(params, lr=self.lr_client)
        client = Party("client", optimizer=lambda _: opt,
                       data={"x": private_x, **({"y": private_y} if private_y is not None else {})})
        server = _HijackingServer(self, public_x, generator)
        pipeline = Pipeline([[Segment(client, client_part)], [Segment(Party("server"), nn.Identity())]], wire)
        hooks: dict[str, Hook] = {"server": server, **({"client": detector} if detector is not None else {})}
        sl = SplitNN(pipeline, [Task("label", owner=client)] if private_y is not None else [],
                     config=SplitConfig(batch_size=batch), hooks=hooks, generator=generator, name="FSHA")
        log: dict[str, list] = {k: [] for k in ("steps", "fake", "hijack_loss", "autoencoder_loss",
                                                "discriminator_loss")}
        history: list[float] = []
        rec, rows = None, None
        start = time.perf_counter()
        try:
            for step, *_ in progress(sl.train_steps(n_steps), show=show_progress, total=n_steps, desc="FSHA"):
                # caller-side evaluation: the private batch meets the server's output here only
                rec, losses = server.last
                rows = sl.batches[step]
                history.append(float(mse(rec, private_x[rows]).mean()))
                log["steps"].append(step)
                log["fake"].append(step in getattr(detector, "fake_steps", ()))
                for k, v in losses.items():
                    log[k].append(v)
        except KeyboardInterrupt:  # keep what was learnt so far
            pass
        extras: dict[str, Any] = {**log, "rows": rows, "seconds": time.perf_counter() - start}
        if detector is not None:
            extras["flagged_at"] = getattr(detector, "flagged_at", None)
        return AttackResult("fsha", reconstruction=rec, history=history, config=self.config(), extras=extras)

    # -- the transcript attack -----------------------------------------------------------
    def run(self, observed: Sequence[Transfer], *, show_progress: bool = False,
            generator: torch.Generator | None = None, max_steps: int | None = None) -> AttackResult:
        """Invert the activations in ``observed`` with the trained decoder: f~^-1(z), (N, C, H, W).

        Raises ValueError when the transcript holds no activations, when their shape is not the
        one the decoder was trained on, or when there is no decoder yet.
        """
        if max_steps is not None:
            positive_int("max_steps", max_steps)
        chosen = select(observed, "activations", "FeatureSpaceHijacking")
        z = stack(chosen, "FeatureSpaceHijacking")  # (N, ...) smashed data, in transcript order
        if self._decoder is None:
            raise ValueError("FeatureSpaceHijacking has no decoder yet: run attack_training first "
                             "(or pass a trained decoder=)")
        if self._z_shape is not None and tuple(z.shape[1:]) != self._z_shape:
            raise ValueError(f"the decoder inverts smashed data of shape {self._z_shape} per sample; the "
                             f"transcript's activations have shape {tuple(z.shape[1:])}")
        was = self._decoder.training
        self._decoder.eval()
        try:
            with torch.no_grad():
                rec = torch.cat([self._decoder(chunk) for chunk in
                                 progress(z.split(1024), show=show_progress, desc="FSHA decode")])
        except RuntimeError as err:
            raise ValueError(f"the decoder cannot take activations of shape {tuple(z.shape[1:])}: {err}") from None
        finally:
            self._decoder.train(was)
        return AttackResult("fsha", reconstruction=rec, config=self.config(),
                            extras={"steps": [t.step for t in chosen]})


class _HijackingServer(Hook):
    """FSHA's malicious server as a hook on the split training loop: it trains its own networks
    on what it receives and answers with the hijacking gradient instead of the task's."""

    def __init__(self, attack: FeatureSpaceHijacking, public_x: Tensor, generator: torch.Generator | None):
        self.attack, self.public_x, self.generator = attack, public_x, generator
        self.last: tuple[Tensor, dict] | None = None  # the latest reconstruction and losses

    def respond(self, step: int, received: Sequence[Tensor], labels: Tensor | None) -> list[Tensor]:
        attack, (z,) = self.attack, received  # (B, ...) smashed data as received; labels ignored
        if attack._optimizers is None:
            attack._build(z, self.public_x, self.generator)
        elif tuple(z.shape[1:]) != attack._z_shape:
            raise ValueError(f"this attack was trained on smashed data of shape {attack._z_shape}, "
                             f"got {tuple(z.shape[1:])}")
        x_pub = self.public_x[torch.randint(len(self.public_x), (len(z),), generator=self.generator)]
        grad, rec, losses = attack._server_step(z, x_pub, self.generator)
        self.last = (rec, losses)
        return [grad]
