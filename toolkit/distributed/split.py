"""Split learning across processes: the same SplitNN code, another transport.

Vanilla and U-shaped split learning (Vepakomma, Gupta, Swedish, Raskar, "Split learning for
health", 2018) and the relay of several clients (Gupta & Raskar, "Distributed learning of deep
neural network over multiple agents", 2018) run with their parties in different OS processes.
Every process builds the same :class:`~toolkit.split.SplitNN` (or
:class:`~toolkit.split.Relay`) from the same seed and runs every party's computation (SPMD);
the parties it does not host are *shadows*:

* their data here is a placeholder: zeros of the right shape and dtype, built from a plain
  description (shapes and class count) that the data holder publishes through the store
  (:func:`share_datasets`); the raw data never leaves its process;
* their model weights here are zeroed after construction (:func:`shadow_parties`). The initial
  weights are a function of the shared seed (each process computes them, then zeroes the
  shadows'); trained weights exist only in their host process.

The wire's :class:`~toolkit.distributed.transport.ProcessTransport` replaces what a hosted
receiver gets with what really arrived, so every real computation sees real values, and every
random draw (the batch order, wire transforms with generators) is the same in every process.
Byte counts are the wire's own and equal the in-process run's. A process's transcript is exact
for transfers a hosted party sent or received; the others hold shadow values. Losses are real
only in the process that hosts the party computing them (the server in vanilla and relay, the
client in U-shaped); :func:`run` reports NaN for them elsewhere.

A sender-side wire transform (e.g. activation noise) need not be known to the receiver: in
vanilla split learning the server process may seed the client's noise generator differently
(only the client's real draws reach it). In U-shaped the server's activations go through the
same transform (one generator, draws interleaved), so there the processes share its seed.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor, nn

from toolkit.data import Dataset
from toolkit.messages import Transfer
from toolkit.parties import flat_state
from toolkit.split import Relay, SplitConfig, SplitNN
from toolkit.wire import Transport, Wire

CONFIGURATIONS = ("vanilla", "u-shaped", "relay")
LOSS_PARTY = {"vanilla": "server", "u-shaped": "client", "relay": "server"}
_DESCRIPTION_KEYS = {"name", "classes", "x_train", "x_test", "n_train", "n_test"}


def _check_configuration(configuration: str) -> str:
    if configuration not in CONFIGURATIONS:
        raise ValueError(f"unknown split configuration {configuration!r}; choose one of {list(CONFIGURATIONS)}")
    return configuration


def data_parties(configuration: str, n_clients: int = 1) -> list[str]:
    """The parties holding data: ``["client"]``, or ``client:0 .. client:K-1`` for the relay."""
    if _check_configuration(configuration) != "relay":
        return ["client"]
    if isinstance(n_clients, bool) or not isinstance(n_clients, int) or n_clients < 2:
        raise ValueError(f"the relay needs at least two clients, got {n_clients!r}")
    return [f"client:{k}" for k in range(n_clients)]


def default_hosts(configuration: str, world_size: int) -> dict[str, int]:
    """Party -> rank: the server on rank 0 (it hosts the rendezvous store, the address clients
    dial), the client on rank 1; for the relay, ``client:k`` on rank ``k + 1`` (world_size - 1 clients)."""
    _check_configuration(configuration)
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        raise ValueError(f"world_size must be an int, got {world_size!r}")
    if configuration != "relay":
        if world_size != 2:
            raise ValueError(f"{configuration} split learning has two parties (client, server): it needs "
                             f"world_size 2, got {world_size}")
        return {"server": 0, "client": 1}
    if world_size < 3:
        raise ValueError(f"the relay needs a server and at least two clients: world_size >= 3, got {world_size}")
    return {"server": 0, **{name: k + 1 for k, name in enumerate(data_parties("relay", world_size - 1))}}


def check_hosts(configuration: str, hosts: Mapping[str, int], world_size: int, n_clients: int = 1) -> dict[str, int]:
    """``hosts`` checked: every party of the configuration on a rank in [0, world_size), nothing else."""
    parties = {"server", *data_parties(configuration, n_clients)}
    hosts = dict(hosts)
    missing, unknown = parties - set(hosts), set(hosts) - parties
    if missing or unknown:
        raise ValueError(f"hosts must place exactly the parties {sorted(parties)} of {configuration} split learning; "
                         f"missing {sorted(missing)}, unknown {sorted(unknown)}")
    for name, rank in hosts.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"hosts[{name!r}] must be a rank in [0, {world_size}), got {rank!r}")
    idle = set(range(world_size)) - set(hosts.values())
    if idle:
        raise ValueError(f"rank(s) {sorted(idle)} host no party of {configuration} split learning")
    return hosts


# -- data: described, not shared ---------------------------------------------------------------
def describe(ds: Dataset) -> dict:
    """What a shadow needs to know about a party's data: shapes and the class count (JSON-safe)."""
    if not isinstance(ds, Dataset):
        raise TypeError(f"describe needs a toolkit.data.Dataset, got {type(ds).__name__}")
    return {"name": ds.name, "classes": ds.n_classes, "x_train": list(ds.x_train.shape),
            "x_test": list(ds.x_test.shape), "n_train": len(ds.y_train), "n_test": len(ds.y_test)}


def shadow_dataset(description: Mapping) -> Dataset:
    """A placeholder for another party's data: float32 zeros of the described shapes, labels zero."""
    if not isinstance(description, Mapping) or set(description) != _DESCRIPTION_KEYS:
        got = sorted(description) if isinstance(description, Mapping) else type(description).__name__
        raise ValueError(f"a data description has the keys {sorted(_DESCRIPTION_KEYS)}, got {got}")
    shapes = {k: description[k] for k in ("x_train", "x_test")}
    for key, shape in shapes.items():
        if not isinstance(shape, list) or len(shape) < 2 or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ValueError(f"data description: {key} must be a shape [N, ...] of non-negative ints, got {shape!r}")
    n_train, n_test, classes = description["n_train"], description["n_test"], description["classes"]
    if n_train != shapes["x_train"][0] or n_test != shapes["x_test"][0]:
        raise ValueError(f"data description: n_train {n_train!r} / n_test {n_test!r} do not match the shapes "
                         f"{shapes['x_train']} / {shapes['x_test']}")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise ValueError(f"data description: classes must be a positive int, got {classes!r}")
    return Dataset(f"{description['name']} (shadow)", torch.zeros(shapes["x_train"]),
                   torch.zeros(n_train, dtype=torch.long), torch.zeros(shapes["x_test"]),
                   torch.zeros(n_test, dtype=torch.long), [f"class {k}" for k in range(classes)])


def share_datasets(group, hosts: Mapping[str, int], datasets: Mapping[str, Dataset], parties: Sequence[str], *,
                   timeout: float | None = None) -> dict[str, Dataset]:
    """Each data-holding party hosted here publishes :func:`describe` of its data through the
    store (``split/data/<party>``); every other one becomes a :func:`shadow_dataset` of what its
    host published. Returns party -> dataset (real for hosted parties, shadows otherwise).

    ``datasets`` must hold exactly the hosted data parties: data for a party hosted elsewhere is
    refused (no process holds another party's data).
    """
    rank = group.rank
    hosted = [p for p in parties if hosts[p] == rank]
    extra = set(datasets) - set(hosted)
    if extra:
        raise ValueError(f"rank {rank} was given data for {sorted(extra)}, which it does not host "
                         f"(it hosts {sorted(n for n, r in hosts.items() if r == rank)}); a process holds "
                         f"only its own parties' data")
    out: dict[str, Dataset] = {}
    for party in hosted:
        if party not in datasets:
            raise ValueError(f"rank {rank} hosts {party} but was given no data for it")
        out[party] = datasets[party]
        group.set(f"split/data/{party}", json.dumps(describe(datasets[party])))
    wait = group.timeout if timeout is None else timeout
    for party in parties:
        if party in out:
            continue
        key = f"split/data/{party}"
        if not group.wait_key(key, wait):
            raise TimeoutError(f"rank {rank}: {party} (rank {hosts[party]}) published no data description "
                               f"within {wait} s")
        try:
            description = json.loads(group.get(key))
        except ValueError as error:
            raise ValueError(f"{party}'s data description is not JSON: {error}") from None
        out[party] = shadow_dataset(description)
    return out


# -- building: the same split in every process, shadows zeroed ---------------------------------
def build(configuration: str, parts: Sequence[nn.Module], datasets: Mapping[str, Dataset], *,
          hosted: Sequence[str] | None = None, transport: Transport | None = None,
          config: SplitConfig | None = None, transforms: Sequence[Callable] = (), handoff: str = "peer"
          ) -> SplitNN | Relay:
    """The split of ``configuration`` over ``datasets`` (party -> Dataset, shadows included),
    its wire on ``transport``; the parties not in ``hosted`` (all hosted when None) are made
    shadows by :func:`shadow_parties`.

    ``parts``: (client part, server part) for vanilla and the relay, (head, middle, tail) for
    U-shaped (the client holds head and tail).
    """
    _check_configuration(configuration)
    config = config if config is not None else SplitConfig()
    wire = Wire(transforms, record=config.record, transport=transport)
    need = 3 if configuration == "u-shaped" else 2
    if len(parts) != need:
        raise ValueError(f"{configuration} split learning takes {need} model parts, got {len(parts)}")
    names = data_parties(configuration, max(len(datasets), 2) if configuration == "relay" else 1)
    if sorted(datasets) != sorted(names):
        raise ValueError(f"{configuration} split learning needs data for {names}, got {sorted(datasets)}")
    if configuration == "vanilla":
        split = SplitNN.vanilla(parts[0], parts[1], datasets["client"], config=config, wire=wire)
    elif configuration == "u-shaped":
        split = SplitNN.u_shaped(*parts, datasets["client"], config=config, wire=wire)
    else:
        split = Relay(parts[0], parts[1], [datasets[n] for n in names], handoff=handoff, config=config, wire=wire)
    if hosted is not None:
        shadow_parties(split, hosted)
    return split


def parties_of(split: SplitNN | Relay) -> list:
    """Every party of ``split`` (a SplitNN's, or a relay's clients and server)."""
    return list(split.parties) if isinstance(split, SplitNN) else [*split.clients, split.server]


def shadow_parties(split: SplitNN | Relay, hosted: Sequence[str]) -> list[str]:
    """Zero the data and the model weights (floating parameters and buffers) of every party of
    ``split`` not in ``hosted``; returns the shadows' names."""
    names = [p.name for p in parties_of(split)]
    unknown = set(hosted) - set(names)
    if unknown:
        raise ValueError(f"hosted names parties {sorted(unknown)} that are not in this split ({names})")
    shadows = []
    with torch.no_grad():
        for party in parties_of(split):
            if party.name in hosted:
                continue
            for module in party.modules:
                for t in [*module.parameters(), *module.buffers()]:
                    if t.is_floating_point():
                        t.zero_()
            for key, value in party.data.items():
                party.data[key] = torch.zeros_like(value)
            shadows.append(party.name)
    return shadows


def weights(split: SplitNN | Relay, names: Sequence[str]) -> dict[str, Tensor]:
    """Party -> all its segments' weights as one flat tensor (:func:`toolkit.parties.flat_state`)."""
    by_name = {p.name: p for p in parties_of(split)}
    return {n: torch.cat([flat_state(m) for m in by_name[n].modules]) for n in names}


# -- one process's side ------------------------------------------------------------------------
@dataclass
class Outcome:
    """What one process ends with: exact for its hosted parties (see the module docstring)."""

    rank: int
    hosted: list[str]
    history: pd.DataFrame                 # loss/accuracy NaN unless this process hosts the loss party
    weights: dict[str, Tensor]            # hosted parties' final weights
    total_bytes: int
    ledger: pd.DataFrame
    transcript: list[Transfer]            # exact where a hosted party sent or received
    held: dict[str, dict[str, float]]     # party -> data key -> sum of |values| held in this process
    evaluation: dict[str, float] = field(default_factory=dict)  # NaN unless the loss party is hosted


def run(configuration: str, group, hosts: Mapping[str, int], datasets: Mapping[str, Dataset],
        make_parts: Callable[[tuple[int, ...], int], Sequence[nn.Module]], *,
        config: SplitConfig | None = None, transforms: Sequence[Callable] = (), epochs: int = 1,
        handoff: str = "peer", evaluate: bool = False, transport: Transport | None = None) -> Outcome:
    """Run this process's side of split learning in ``group`` (see the module docstring).

    Args:
        hosts: party -> rank (:func:`default_hosts`), the same in every process.
        datasets: the data of the data-holding parties this rank hosts (none on the server).
        make_parts: ``(input shape, n_classes) -> parts``, deterministic (the same weights in
            every process), see :func:`build`.
        transport: defaults to ``ProcessTransport(group, hosts)``.
    """
    from toolkit.distributed.transport import ProcessTransport

    n_clients = sum(1 for p in hosts if p.startswith("client"))
    parties = data_parties(configuration, n_clients)
    hosts = check_hosts(configuration, hosts, group.world_size, n_clients)
    hosted = sorted(n for n, r in hosts.items() if r == group.rank)
    shared = share_datasets(group, hosts, datasets, parties)
    first = shared[parties[0]]
    parts = make_parts(first.shape, first.n_classes)
    transport = transport if transport is not None else ProcessTransport(group, hosts)
    split = build(configuration, parts, shared, hosted=hosted, transport=transport, config=config,
                  transforms=transforms, handoff=handoff)
    history = split.fit(epochs).copy()
    real = LOSS_PARTY[configuration] in hosted
    if not real:
        for column in history.columns:
            if column.startswith(("loss", "accuracy")):
                history[column] = math.nan
    evaluation = {}
    if evaluate:
        evaluation = {k: (v if real else math.nan) for k, v in split.evaluate().items()}
    wire = split.wire
    held = {p.name: {k: float(v.abs().sum()) for k, v in p.data.items()} for p in parties_of(split)}
    _finish(group, hosts)
    return Outcome(group.rank, hosted, history, weights(split, hosted), wire.total_bytes, wire.ledger(),
                   wire.observed(), held, evaluation)


def _finish(group, hosts: Mapping[str, int]) -> None:
    """Every rank says it is done and waits for the others (so none closes while a peer still receives)."""
    group.set(f"split/done/{group.rank}", "1")
    for rank in sorted(set(hosts.values())):
        if not group.wait_key(f"split/done/{rank}", group.timeout):
            names = sorted(n for n, r in hosts.items() if r == rank)
            raise TimeoutError(f"rank {group.rank}: rank {rank} ({', '.join(names)}) did not finish within "
                               f"{group.timeout} s")
