"""The configurations of the split-learning papers, as constructors of :class:`SplitNN`.

Vepakomma, Gupta, Swedish, Raskar, "Split learning for health: distributed deep learning without
sharing raw patient data" (2018): vanilla, U-shaped (no label sharing), vertically partitioned
data, extended (multi-hop) and multi-task configurations. Each builds the parties and the
pipeline and returns a SplitNN; ``hooks`` (party name -> :class:`toolkit.split.hooks.Hook`) let an
attack or a detector act for a party.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from toolkit.parties import Party
from toolkit.split.config import SplitConfig
from toolkit.split.engine import Pipeline, Segment, Task
from toolkit.split.hooks import Hook
from toolkit.wire import Wire

if TYPE_CHECKING:
    from toolkit.split.splitnn import SplitNN


class Configurations:
    """Mixin holding SplitNN's configuration constructors (``SplitNN.vanilla(...)`` and friends)."""

    @classmethod
    def vanilla(cls, client_part: nn.Module, server_part: nn.Module, data, *, labels: str = "client",
                config: SplitConfig | None = None, wire: Wire | None = None,
                hooks: Mapping[str, Hook] | None = None) -> SplitNN:
        """Client holds the inputs and the bottom layers; the server holds the top and the loss.

        The client sends its cut-layer activations (and its labels, with ``labels="client"``);
        the server sends back the gradient at the cut (Gupta & Raskar, 2018). With
        ``labels="server"`` the server owns the labels: two-party split learning where one party
        has the features and the other the labels (the setting of label-leakage attacks).
        """
        if labels not in ("client", "server"):
            raise ValueError(f"labels must be held by 'client' or 'server', got {labels!r}")
        config, wire = _defaults(config, wire)
        client = Party("client", optimizer=config.make_optimizer(), data=_holdings(data, labels=labels == "client"))
        server = Party("server", optimizer=config.make_optimizer())
        if labels == "server":
            server.data.update(y=data.y_train, y_test=data.y_test)
        pipe = Pipeline([[Segment(client, client_part)], [Segment(server, server_part)]], wire)
        owner = client if labels == "client" else server
        return cls(pipe, [Task("label", owner=owner)], config=config, name="vanilla", hooks=hooks)

    @classmethod
    def u_shaped(cls, head: nn.Module, middle: nn.Module, tail: nn.Module, data, *,
                 config: SplitConfig | None = None, wire: Wire | None = None,
                hooks: Mapping[str, Hook] | None = None) -> SplitNN:
        """The client keeps the first and the last layers: labels never leave it (Vepakomma et al., 2018)."""
        config, wire = _defaults(config, wire)
        client = Party("client", optimizer=config.make_optimizer(), data=_holdings(data, labels=True))
        server = Party("server", optimizer=config.make_optimizer())
        pipe = Pipeline([[Segment(client, head)], [Segment(server, middle)], [Segment(client, tail)]], wire)
        return cls(pipe, [Task("label", owner=client)], config=config, name="u-shaped", hooks=hooks)

    @classmethod
    def multi_hop(cls, parts: Sequence[nn.Module], data, *, names: Sequence[str] | None = None,
                  config: SplitConfig | None = None, wire: Wire | None = None,
                hooks: Mapping[str, Hook] | None = None) -> SplitNN:
        """A chain of three or more segments on distinct parties; the last one computes the loss.

        Default party names: ``client``, ``hop:1``, ..., ``server`` (extended vanilla configuration).
        """
        if len(parts) < 3:
            raise ValueError(f"multi-hop needs at least three segments, got {len(parts)}")
        names = list(names) if names is not None else ["client", *[f"hop:{i}" for i in range(1, len(parts) - 1)], "server"]
        if len(names) != len(parts) or len(set(names)) != len(names):
            raise ValueError(f"multi-hop needs one distinct party name per segment, got {names}")
        config, wire = _defaults(config, wire)
        parties = [Party(n, optimizer=config.make_optimizer()) for n in names]
        parties[0].data.update(_holdings(data, labels=True))
        pipe = Pipeline([[Segment(p, m)] for p, m in zip(parties, parts)], wire)
        return cls(pipe, [Task("label", owner=parties[0])], config=config, name="multi-hop", hooks=hooks)

    @classmethod
    def vertical(cls, client_parts: Sequence[nn.Module], server_part: nn.Module, views: Sequence, *,
                 merge: str = "concat", label_holder: str = "server", config: SplitConfig | None = None,
                 wire: Wire | None = None, hooks: Mapping[str, Hook] | None = None) -> SplitNN:
        """Several clients hold different features of the same samples (vertical / multi-modal).

        Each client ``client:k`` encodes its own view; the server merges the cut-layer outputs
        (``"concat"`` or ``"sum"``) and holds the labels (or ``label_holder="client:k"``, who then
        sends them). Views come from :func:`toolkit.data.vertical_split`.
        """
        if len(client_parts) != len(views) or len(views) < 2:
            raise ValueError(f"vertical split learning needs one client part per view (at least two), "
                             f"got {len(client_parts)} parts and {len(views)} views")
        for k, view in enumerate(views[1:], start=1):
            for split in ("train", "test"):
                a, b = getattr(views[0], f"y_{split}"), getattr(view, f"y_{split}")
                if len(a) != len(b):
                    raise ValueError(f"client:{k} holds {len(b)} {split} samples but client:0 holds {len(a)}: "
                                     f"vertical clients must hold the same samples in the same order")
                if not torch.equal(a, b):
                    raise ValueError(f"client:{k}'s {split} samples are not aligned with client:0's "
                                     f"(their labels differ): align the views by sample id first")
        config, wire = _defaults(config, wire)
        clients = [Party(f"client:{k}", optimizer=config.make_optimizer(), data=_holdings(v, labels=False))
                   for k, v in enumerate(views)]
        server = Party("server", optimizer=config.make_optimizer())
        holder = {p.name: p for p in [server, *clients]}.get(label_holder)
        if holder is None:
            raise ValueError(f"label_holder must be 'server' or a client name, got {label_holder!r}")
        holder.data.update({"y": views[0].y_train, "y_test": views[0].y_test})
        pipe = Pipeline([[Segment(c, m) for c, m in zip(clients, client_parts)], [Segment(server, server_part)]],
                        wire, merge=merge)
        return cls(pipe, [Task("label", owner=holder)], config=config, name="vertical", hooks=hooks)

    @classmethod
    def multi_task(cls, shared: nn.Module, heads: Mapping[str, nn.Module], data, *,
                   targets: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
                   head_parties: Mapping[str, str] | None = None, config: SplitConfig | None = None,
                   wire: Wire | None = None, hooks: Mapping[str, Hook] | None = None) -> SplitNN:
        """A shared client part feeding several heads, each with its own labels and loss.

        Args:
            heads: task name -> head module.
            targets: task name -> function mapping the dataset labels to that task's labels
                (default: the labels themselves), e.g. ``{"parity": lambda y: y % 2}``.
            head_parties: task name -> party holding that head (default ``server:<task>``; heads
                on one party receive the activations once).
        """
        if len(heads) < 2:
            raise ValueError(f"multi-task split learning needs at least two heads, got {list(heads)}")
        targets = dict(targets or {})
        unknown = set(targets) - set(heads)
        if unknown:
            raise ValueError(f"targets given for tasks without a head: {sorted(unknown)}")
        config, wire = _defaults(config, wire)
        client = Party("client", optimizer=config.make_optimizer(), data=_holdings(data, labels=False))
        servers: dict[str, Party] = {}
        segments, tasks = [], []
        for k, (task, head) in enumerate(heads.items()):
            where = (head_parties or {}).get(task, f"server:{task}")
            party = servers.setdefault(where, Party(where, optimizer=config.make_optimizer()))
            segments.append(Segment(party, head))
            fn = targets.get(task, lambda y: y)
            client.data[f"y_{task}"] = fn(data.y_train)
            client.data[f"y_{task}_test"] = fn(data.y_test)
            tasks.append(Task(task, owner=client, head=k, key=f"y_{task}"))
        pipe = Pipeline([[Segment(client, shared)], segments], wire)
        return cls(pipe, tasks, config=config, name="multi-task", hooks=hooks)


def _defaults(config: SplitConfig | None, wire: Wire | None) -> tuple[SplitConfig, Wire]:
    config = config if config is not None else SplitConfig()
    if not isinstance(config, SplitConfig):
        raise TypeError(f"config must be a SplitConfig, got {type(config).__name__}")
    return config, wire if wire is not None else Wire(record=config.record)


def _holdings(data, *, labels: bool) -> dict[str, Tensor]:
    """The tensors a data-holding client keeps: inputs, and labels when it owns them."""
    held = {"x": data.x_train, "x_test": data.x_test}
    if labels:
        held.update(y=data.y_train, y_test=data.y_test)
    return held
