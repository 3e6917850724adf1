"""Ring training across processes: the same :class:`~toolkit.decentralized.RingTraining` code in
every process (SPMD with shadows), each process hosting one node, the model crossing TCP.

Each process discovers its peers through the store (:func:`~toolkit.distributed.discovery.discover`),
builds the ring with its own data and zero placeholders for the others' (shadows), zeroes the
shadows' weights, and runs ``fit`` with a :class:`StoreLiveness`: at every node's turn all
processes agree, through ``TCPStore.compare_set`` (``group.agree(f"alive/{round}/{node}")``),
whether that node answers. The node's own process proposes ``"alive"`` when it gets there; the
others wait up to ``timeout`` seconds for that, then propose ``"dead"``; the first proposal wins
everywhere, so every process heals the ring the same way (RingTraining's own failure path,
:func:`~toolkit.decentralized.topology.heal`) and the run equals the in-process one with
``failures={node: round}``. A process declared dead that was only slow learns it and stops.

A peer that dies inside its own turn (after it was agreed alive, before its model reached its
successor) cannot be skipped: the model is gone. Its peers get a ``ConnectionError`` or
``TimeoutError`` from the transport; the first process to fail publishes why under
:data:`ABORT_KEY`, and every process stops with a RuntimeError naming the root cause (never a hang:
every wait is bounded). Rank 0 hosts the store and the discovery: the ring re-forms around any
other node, not around it.

On a process, the history's ``loss`` mixes the real loss of the hosted node with the shadows';
``test_loss``/``accuracy`` are real on the process hosting the final holder of the model.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from toolkit.decentralized import RingTraining
from toolkit.decentralized.discovery import node_name
from toolkit.distributed.discovery import Roster, discover, shadow_dataset
from toolkit.distributed.transport import ProcessTransport
from toolkit.federated.config import FedConfig
from toolkit.wire import Wire

__all__ = ["ABORT_KEY", "CRASH_EXIT", "LeftRing", "RingRun", "StoreLiveness", "demo_setup", "leave", "run_ring"]

ABORT_KEY = "ring/abort"
ALIVE, DEAD = "alive", "dead"
CRASH_EXIT = 17  # the exit status of a process told to fail (fail_at): it leaves as if killed, closing nothing


class LeftRing(RuntimeError):
    """This process's node was declared dead by its peers (it was too slow): it stops, they go on."""


class StoreLiveness:
    """``(round, node) -> bool`` for ``RingTraining.fit(liveness=...)``, agreed by every process.

    Args:
        group: this process's :class:`~toolkit.distributed.Group`.
        roster: the discovery's :class:`~toolkit.distributed.discovery.Roster` (``roster.node`` is ours).
        timeout: seconds a peer has, from when this process reaches that peer's turn, to say it is
            alive; longer than the gap between processes reaching the same turn (a turn's training).
        fail_at: make this process fail (exit with :data:`CRASH_EXIT`, no clean-up, as a SIGKILL
            would) at its own turn in this round: before answering (``fail_in_turn=False``: the ring
            re-forms, as ``failures={node: fail_at}`` in simulation) or just after answering alive
            (``True``: it dies inside its turn; the run stops with an error naming it).
        on_event: called with a line of text at each of this node's turns and each peer's death.

    ``dead`` maps each node this process saw declared dead to the round.
    """

    def __init__(self, group: Any, roster: Roster, *, timeout: float = 5.0, fail_at: int | None = None,
                 fail_in_turn: bool = False, on_event: Callable[[str], Any] | None = None):
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"the liveness timeout must be a positive number of seconds, got {timeout!r}")
        if fail_at is not None and (isinstance(fail_at, bool) or not isinstance(fail_at, int) or fail_at < 1):
            raise ValueError(f"fail_at is a round >= 1, got {fail_at!r}")
        self.group, self.roster, self.timeout = group, roster, float(timeout)
        self.fail_at, self.fail_in_turn, self.on_event = fail_at, bool(fail_in_turn), on_event
        self.dead: dict[int, int] = {}

    def __call__(self, round: int, node: int) -> bool:
        self.check_abort()
        key = f"alive/{round}/{node}"
        if node == self.roster.node:
            failing = self.fail_at is not None and round >= self.fail_at
            if failing and not self.fail_in_turn:
                self._crash(f"before its turn in round {round}")
            verdict = self._store(self.group.agree, key, ALIVE)
            if verdict != ALIVE:
                raise LeftRing(f"{node_name(node)} (rank {self.group.rank}) was declared dead by its peers in round "
                                   f"{round}: it did not answer within the {self.timeout:g} s liveness timeout")
            self._event(f"turn round={round} {node_name(node)}")
            if failing:
                self._crash(f"inside its turn in round {round}")
            return True
        deadline = time.monotonic() + self.timeout
        while not self._store(self.group.wait_key, key, 0.02):
            self.check_abort()
            if time.monotonic() > deadline:
                verdict = self._store(self.group.agree, key, DEAD)
                break
        else:
            verdict = self._store(self.group.get, key)
        if verdict == DEAD:
            self.dead[node] = round
            self._event(f"dead round={round} {node_name(node)} (rank {self.roster.ranks[node]})")
        return verdict == ALIVE

    def check_abort(self) -> None:
        """Raise the RuntimeError another process published, if one stopped the run."""
        if self._store(self.group.wait_key, ABORT_KEY, 0):
            raise RuntimeError(f"the run was stopped by {self._store(self.group.get, ABORT_KEY)}")

    def _store(self, op: Callable, *args: Any) -> Any:
        try:
            return op(*args)
        except (TimeoutError, ValueError):
            raise
        except Exception as e:  # noqa: BLE001  (torch's store errors: the store host is gone)
            raise RuntimeError(f"rank {self.group.rank} lost the rendezvous store hosted by rank 0 "
                               f"({node_name(self._node_of(0))}): {str(e).splitlines()[0][:200]}") from None

    def _node_of(self, rank: int) -> int:
        return next((v for v, r in self.roster.ranks.items() if r == rank), -1)

    def _event(self, text: str) -> None:
        if self.on_event is not None:
            self.on_event(text)

    def _crash(self, when: str) -> None:
        self._event(f"crash {node_name(self.roster.node)} {when}")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(CRASH_EXIT)


class _Observed:
    """A transport that tells ``on_event`` when the hosted node's model left for a peer."""

    def __init__(self, inner: ProcessTransport, me: str, on_event: Callable[[str], Any] | None):
        self.inner, self.me, self.on_event = inner, me, on_event

    def deliver(self, tensor, *, sender, receiver, kind):
        out = self.inner.deliver(tensor, sender=sender, receiver=receiver, kind=kind)
        if self.on_event is not None and sender == self.me and kind == "weights" and receiver != self.me:
            self.on_event(f"forwarded {sender}->{receiver}")
        return out

    def deliver_broadcast(self, tensor, *, sender, receivers, kind):
        return self.inner.deliver_broadcast(tensor, sender=sender, receivers=receivers, kind=kind)

    def __repr__(self) -> str:
        return repr(self.inner)


@dataclass
class RingRun:
    """One process's share of a run: its :class:`~toolkit.decentralized.RingTraining` (with shadows),
    the :class:`StoreLiveness` it consulted and the discovery's roster."""

    ring: RingTraining
    liveness: StoreLiveness
    roster: Roster

    def summary(self) -> dict[str, Any]:
        """This process's results as plain JSON-able data: its node's real weights (``weights``), the
        circulating model and its test metrics if this node holds it (else None), the live and
        failed nodes, the deaths it saw, the Wire's byte and transfer counts (as in-process) and
        what this process itself put on and took off the network, and the transcript's entries
        (step, sender, receiver, kind, shape), the same in every process and in-process."""
        ring, node = self.ring, self.roster.node
        shadows = [v for v in range(len(ring.names)) if v != node]
        transport = ring.wire.transport.inner
        return {"node": node, "rounds": ring.round, "alive": ring.alive, "failed": ring.failed,
                "dead": {str(v): r for v, r in self.liveness.dead.items()}, "order": ring.order,
                "holder": ring.holder, "bytes": ring.wire.total_bytes, "transfers": len(ring.wire),
                "sent_bytes": transport.sent_bytes, "received_bytes": transport.received_bytes,
                "shadow_data_zero": bool((ring.data.x[shadows] == 0).all()) if shadows else True,
                "weights": ring.node_weights[node].tolist(),
                "model": ring.weights.tolist() if ring.holder == node else None,
                "test": ring.evaluate() if ring.holder == node else None,
                "failed_per_round": [int(v) for v in ring.history["failed"]],
                "transcript": [[t.step, t.sender, t.receiver, t.kind, list(t.tensor.shape)] for t in ring.wire.observed()]}


def run_ring(group: Any, node: int, dataset: Any, model: nn.Module, *, rounds: int, topology: Any = None,
             initiator: int | None = None, order: Sequence[int] | None = None, config: FedConfig | None = None,
             personal: Sequence[str] = (), liveness_timeout: float = 5.0, fail_at: int | None = None,
             fail_in_turn: bool = False, on_event: Callable[[str], Any] | None = None
             ) -> RingRun:
    """Host ``node`` with ``dataset`` in a ring of processes and train ``rounds`` rounds.

    Every process calls it with the same ``model`` weights (the same seed), ``config`` and
    ``rounds``; rank 0 also gives the ``topology`` (and optionally ``initiator``) to announce.
    Returns a :class:`RingRun`: ``ring.node_weights[node]`` is this node's real model,
    ``ring.weights`` the circulating model (real on the process hosting ``ring.holder``),
    ``ring.alive``/``ring.failed`` as in simulation, ``liveness.dead`` the node -> round of each death.
    A failure is published for every process and raised as a RuntimeError naming its cause.
    """
    roster = None
    try:
        roster = discover(group, node, dataset, topology=topology, initiator=initiator)
        transport = ProcessTransport(group, roster.hosts())
        config = config or FedConfig()
        wire = Wire(record=config.record, transport=_Observed(transport, node_name(node), on_event))
        n = roster.topology.number_of_nodes()
        datasets = [dataset if v == node else shadow_dataset(roster.info[v]) for v in range(n)]
        ring = RingTraining(model, datasets, roster.topology, test=dataset, config=config, wire=wire,
                            personal=personal, initiator=roster.initiator, order=order)
        with torch.no_grad():
            ring.node_weights[[v for v in range(n) if v != node]] = 0.0  # no process holds a peer's model
        liveness = StoreLiveness(group, roster, timeout=liveness_timeout, fail_at=fail_at, fail_in_turn=fail_in_turn,
                                 on_event=on_event)
        ring.fit(rounds, liveness=liveness)
        return RingRun(ring, liveness, roster)
    except LeftRing:
        raise  # the others go on without this node: nothing to tell them
    except Exception as e:  # noqa: BLE001  (published for the peers, then raised with the root cause)
        hosts = (f" [{', '.join(f'rank {r} hosts {node_name(v)}' for v, r in sorted(roster.ranks.items()))}]"
                 if roster is not None else "")  # who is who, once discovery is done
        cause = f"rank {group.rank} ({node_name(node)}): {type(e).__name__}: {e}{hosts}"
        try:
            first = group.agree(ABORT_KEY, cause)
        except Exception:  # noqa: BLE001  (the store is gone: our own cause is all there is)
            first = cause
        if first == cause or str(e).startswith("the run was stopped by"):
            raise RuntimeError(f"ring training stopped: {cause}") from e
        raise RuntimeError(f"ring training stopped: {first} (then {cause})") from e


def leave(group: Any, run: RingRun | None) -> None:
    """Close ``group``, first saying for each dead peer that it left (rank 0 waits for everyone's
    goodbye before closing the store, and a dead peer never says it); after a failed run
    (``run`` None) rank 0 waits at most 2 s for the others."""
    if run is None:
        group.close(timeout=2.0)
        return
    for v in run.liveness.dead:
        try:
            group.set(f"left/{run.roster.ranks[v]}", "1")
        except Exception:  # noqa: BLE001  (the store may be gone)
            pass
    group.close()


def demo_setup(dataset: str = "loan", n_nodes: int = 3, *, n_samples: int = 600, seed: int = 0
               ) -> tuple[nn.Module, list]:
    """The issue's demonstration: ``dataset`` (a tabular one) split iid among ``n_nodes`` nodes, and a
    tabular MLP initialized under ``seed``; every process and the in-process reference build the same."""
    from toolkit import data, models

    options = {"n_samples": n_samples} if dataset == "loan" else {}
    ds = data.load(dataset, seed=seed, **options)
    if ds.is_image:
        raise ValueError(f"demo_setup builds a tabular MLP: {dataset!r} is an image dataset")
    parts = data.partition(ds, n_nodes, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = models.tabular_mlp(ds.shape[0], ds.n_classes)
    return model, parts
