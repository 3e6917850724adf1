"""A small model zoo, and ``cut(model, at=...)`` to split a model between parties.

Every model is an ``nn.Sequential`` with named layers (``conv1``, ``act1``, ``pool1``, ...), so a
cut can be given by index or by layer name and the parts keep readable names.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import pandas as pd
import torch
from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def mlp(sizes: Sequence[int], *, activation: str = "relu") -> nn.Sequential:
    """Fully connected network ``sizes[0] -> ... -> sizes[-1]`` with a leading Flatten.

    Example:
        >>> mlp([64, 128, 10])
        Sequential(
          (flatten): Flatten(start_dim=1, end_dim=-1)
          (fc1): Linear(in_features=64, out_features=128, bias=True)
          (act1): ReLU()
          (fc2): Linear(in_features=128, out_features=10, bias=True)
        )
    """
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"mlp needs at least two positive sizes, got {list(sizes)}")
    _activation(activation)  # validate even when there is no hidden layer
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        layers.append((f"fc{i}", nn.Linear(int(a), int(b))))
        if i < len(sizes) - 1:
            layers.append((f"act{i}", _activation(activation)))
    return nn.Sequential(OrderedDict(layers))


def tabular_mlp(n_features: int, n_classes: int, *, hidden: Sequence[int] = (64, 32),
                activation: str = "relu") -> nn.Sequential:
    """MLP for tabular data: ``n_features -> hidden... -> n_classes``."""
    return mlp([n_features, *hidden, n_classes], activation=activation)


def lenet(*, in_channels: int = 1, image_size: int = 28, n_classes: int = 10,
          variant: str = "classic") -> nn.Sequential:
    """LeNet-5 style network.

    Args:
        variant: ``"classic"`` (LeCun et al., 1998: conv-relu-pool x2, fc 120-84) or ``"dlg"``, the
            sigmoid LeNet of "Deep Leakage from Gradients" (Zhu, Liu, Han, 2019): three 5x5 convs with
            12 channels (strides 2, 2, 1), sigmoid activations, one linear layer. Its smooth,
            twice-differentiable activations are what gradient-matching attacks assume.
    """
    if image_size < 16:
        raise ValueError(f"lenet needs images of at least 16x16, got {image_size}x{image_size}; "
                         f"use load('digits', image_size=32) or models.convnet for 8x8 digits")
    if variant == "classic":
        feature_layers = [
            ("conv1", nn.Conv2d(in_channels, 6, 5, padding=2 if image_size < 32 else 0)),
            ("act1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(6, 16, 5)), ("act2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
            ("flatten", nn.Flatten()),
        ]
        head = [("fc1", 120, "act3"), ("fc2", 84, "act4")]
    elif variant == "dlg":
        feature_layers = [
            ("conv1", nn.Conv2d(in_channels, 12, 5, padding=2, stride=2)), ("act1", nn.Sigmoid()),
            ("conv2", nn.Conv2d(12, 12, 5, padding=2, stride=2)), ("act2", nn.Sigmoid()),
            ("conv3", nn.Conv2d(12, 12, 5, padding=2, stride=1)), ("act3", nn.Sigmoid()),
            ("flatten", nn.Flatten()),
        ]
        head = []
    else:
        raise ValueError(f"unknown lenet variant {variant!r}; choose 'classic' or 'dlg'")
    width = _output_numel(nn.Sequential(OrderedDict(feature_layers)), (in_channels, image_size, image_size))
    layers = list(feature_layers)
    for name, size, act in head:
        layers += [(name, nn.Linear(width, size)), (act, nn.ReLU())]
        width = size
    layers.append(("fc3" if head else "fc", nn.Linear(width, n_classes)))
    return nn.Sequential(OrderedDict(layers))


def init_uniform_(model: nn.Module, a: float = 0.5, *, generator: torch.Generator | None = None) -> nn.Module:
    """Set every parameter uniform in (-a, a), in place, and return the model: the initialization
    of the LeNet in "Deep Leakage from Gradients" (Zhu, Liu, Han, 2019)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=generator) * 2 * a - a)
    return model


def convnet(*, in_channels: int = 1, image_size: int = 8, n_classes: int = 10,
            width: int = 16) -> nn.Sequential:
    """A small two-block ConvNet (3x3 convs, ReLU, 2x2 max-pool) that fits 8x8 digits and up."""
    if image_size < 4:
        raise ValueError(f"convnet needs images of at least 4x4, got {image_size}x{image_size}")
    features = [
        ("conv1", nn.Conv2d(in_channels, width, 3, padding=1)), ("act1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(width, 2 * width, 3, padding=1)), ("act2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
    ]
    n_flat = _output_numel(nn.Sequential(OrderedDict(features)), (in_channels, image_size, image_size))
    return nn.Sequential(OrderedDict(features + [("fc", nn.Linear(n_flat, n_classes))]))


MODELS: dict[str, Callable[..., nn.Sequential]] = {
    "mlp": mlp,
    "tabular_mlp": tabular_mlp,
    "lenet": lenet,
    "convnet": convnet,
}


def build(name: str, **kwargs) -> nn.Sequential:
    """Build a zoo model by name, e.g. ``build("lenet", variant="dlg", image_size=32)``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)


def _output_numel(module: nn.Module, input_shape: Sequence[int]) -> int:
    with torch.no_grad():
        return int(module(torch.zeros(1, *input_shape)).numel())


# -- cutting ------------------------------------------------------------------------------
def layer_names(model: nn.Sequential) -> list[str]:
    """Names of the layers of a Sequential, in order."""
    return [name for name, _ in model.named_children()]


def _position(model: nn.Sequential, at: int | str) -> int:
    names = layer_names(model)
    if isinstance(at, bool) or not isinstance(at, (int, str)):
        raise ValueError(f"a cut is an int or a layer name, got {at!r}")
    if isinstance(at, str):
        if at not in names:
            raise ValueError(f"no layer named {at!r} to cut at; the layers are {names}")
        pos = names.index(at) + 1
    else:
        pos = at
    if not 1 <= pos <= len(names) - 1:
        raise ValueError(f"cut at {at!r} is out of range: the model has {len(names)} layers "
                         f"({names[0]} .. {names[-1]}), so a cut must leave at least one layer on each "
                         f"side: an int in 1..{len(names) - 1}, or a layer name other than {names[-1]!r}")
    return pos


def cut(model: nn.Sequential, at: int | str | Sequence[int | str], *,
        input_shape: Sequence[int] | None = None) -> tuple[nn.Sequential, ...]:
    """Split a Sequential into consecutive parts for different parties.

    Args:
        model: an ``nn.Sequential`` (every zoo model is one).
        at: where to cut. An int ``k`` cuts after the first ``k`` layers (the client keeps
            ``model[:k]``); a layer name cuts just after that layer (the client keeps it). A
            sequence of cuts gives more parts: two cuts give (head, middle, tail) for the
            U-shaped configuration, more give a multi-hop chain.
        input_shape: per-sample input shape; when given, the parts are run on a dummy batch and
            a ValueError names the layer and shapes if they do not chain.

    Returns:
        The parts, as Sequentials that share their layers with ``model`` (deep-copy the model
        first to keep it apart).

    Example:
        >>> client, server = cut(mlp([64, 128, 10]), at="act1")
        >>> layer_names(client), layer_names(server)
        (['flatten', 'fc1', 'act1'], ['fc2'])
    """
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"cut needs an nn.Sequential (every zoo model is one), got {type(model).__name__}")
    cuts = list(at) if isinstance(at, (list, tuple)) else [at]
    if not cuts:
        raise ValueError("cut needs at least one cut position")
    positions = [_position(model, c) for c in cuts]
    if any(b <= a for a, b in zip(positions, positions[1:])):
        raise ValueError(f"cuts must be strictly increasing positions, got {cuts} -> {positions}")
    items = list(model.named_children())
    bounds = [0, *positions, len(items)]
    parts = tuple(nn.Sequential(OrderedDict(items[a:b])) for a, b in zip(bounds[:-1], bounds[1:]))
    if input_shape is not None:
        check_chain(parts, input_shape)
    return parts


def check_chain(parts: Sequence[nn.Module], input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Run a dummy batch through ``parts`` in order; return each part's per-sample output shape.

    Raises ValueError naming the part, the layer and the shapes when they do not chain.
    Modules are run in eval mode (no BatchNorm statistics change) and restored afterwards.
    """
    x = torch.zeros(2, *(int(s) for s in input_shape))
    shapes = []
    for i, part in enumerate(parts):
        x = trace(part, x, where=f"part {i}")
        shapes.append(tuple(x.shape[1:]))
    return shapes


def trace(part: nn.Module, x: torch.Tensor, *, where: str = "") -> torch.Tensor:
    """Run ``x`` through ``part`` layer by layer without gradients, in eval mode.

    A layer that rejects its input raises ValueError naming ``where``, the layer and the shape.
    """
    children = list(part.named_children()) if isinstance(part, nn.Sequential) else [(type(part).__name__, part)]
    for name, layer in children:
        x = _run_layer(layer, x, f"{where + ' ' if where else ''}layer {name!r} ({layer})")
    return x


def _run_layer(layer: nn.Module, x: torch.Tensor, where: str) -> torch.Tensor:
    modes = [(m, m.training) for m in layer.modules()]
    layer.eval()
    try:
        with torch.no_grad():
            return layer(x)
    except (RuntimeError, ValueError, IndexError) as err:
        raise ValueError(f"shapes do not chain: {where} cannot take input of shape "
                         f"{tuple(x.shape[1:])} (per sample): {err}") from None
    finally:
        for m, mode in modes:
            m.train(mode)


def layer_table(model: nn.Sequential, input_shape: Sequence[int]) -> pd.DataFrame:
    """One row per layer: position (a cut there keeps layers up to it), name, output shape, params.

    Handy for choosing a cut: the output shape is what crosses the wire if you cut after it.
    """
    x = torch.zeros(2, *input_shape)
    rows = []
    for pos, (name, layer) in enumerate(model.named_children(), start=1):
        x = _run_layer(layer, x, f"layer {name!r} ({layer})")
        rows.append({"cut_at": pos, "name": name, "layer": type(layer).__name__,
                     "output_shape": tuple(x.shape[1:]), "output_numel": int(x[0].numel()),
                     "params": sum(p.numel() for p in layer.parameters())})
    return pd.DataFrame(rows)
