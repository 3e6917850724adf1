"""The machinery of the aggregation suite's measurements (:mod:`toolkit.experiments_aggregation`):
a Wire that attributes compute to the party that sends next, the wrapper that times a scheme's
aggregation in each round, and the *probe round* whose server transcript the gradient attack reads.

The probe (:func:`probe_round`) runs a scheme's own protocol once for the round's cohort, every client
holding one sample and taking one SGD step: the single-sample, single-step update DLG-style attacks
invert. The attack then gets what the server received from the target client, read as an update
(:func:`server_reading`): the plain update, a masked ring vector decoded as fixed point (uniform
noise to anyone without the masks), or nothing at all for a ciphertext.

Example:
    >>> wire = ClockedWire(("client:0", "client:1"), keep="client:1")
    >>> _ = wire.send(torch.ones(2, 3), sender=("client:0", "client:1"), receiver="server", kind="update")
    >>> wire.observed(by="server")  # only client:1's row is kept
    [Transfer(step=0, client:1 -> server, update (3,) float32, 12 B)]
    >>> wire.total_bytes  # both rows are counted
    24
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor, nn

from toolkit import data as datasets
from toolkit import metrics
from toolkit.federated import ClientData, FedConfig, FederatedAveraging
from toolkit.federated.wire_aggregation import SERVER, Aggregate, Uploads, WireAggregator
from toolkit.messages import Record, Transfer
from toolkit.wire import Wire

if TYPE_CHECKING:
    from toolkit.experiments_aggregation import SuiteConfig

__all__ = ["ClockedWire", "TimedAggregation", "Probe", "server_reading", "probe_round", "attack_leakage",
           "client_groups"]

Scheme = Callable[[FedConfig, int], Any]


# -- compute attributed by the Wire --------------------------------------------------------------
class ClockedWire(Wire):
    """A Wire that attributes each round's compute and bytes to the clients or the other parties.

    While a round's aggregation runs (:meth:`start` .. :meth:`stop`) the wall time before each send is
    charged to its sender (a client, or the server / a helper party), and the time from the server's
    download to :meth:`start` to the clients (their local training). Bytes are counted per round from
    every send: ``client_bytes_up`` what clients sent, ``client_bytes_down`` what they received.
    ``keep`` records only the transfers to or from that party (a probe round of a thousand clients
    keeps one client's messages); every byte is counted either way.
    """

    def __init__(self, clients: tuple[str, ...], *, keep: str | None = None, record: bool = True):
        super().__init__(record=record)
        self.clients, self.keep = frozenset(clients), keep
        self._last: float | None = None
        self.round = self._fresh()

    @staticmethod
    def _fresh() -> dict[str, float]:
        return {"client_seconds": 0.0, "server_seconds": 0.0, "client_messages": 0, "client_bytes_up": 0,
                "client_bytes_down": 0}

    def _is_client(self, names: Any) -> bool:
        return (names[0] if type(names) is tuple else names) in self.clients

    def _charge(self, sender: Any) -> None:
        now = time.perf_counter()
        if self._last is not None:
            client = self._is_client(sender)
            self.round["client_seconds" if client else "server_seconds"] += now - self._last
            self.round["client_messages"] += int(client)
            self._last = now
        elif sender == SERVER:  # the server's download: the clients' training starts
            self._last = now

    def _count(self, sender: Any, receiver: Any, nbytes: int) -> None:
        if self._is_client(sender):
            self.round["client_bytes_up"] += nbytes
        if self._is_client(receiver):
            self.round["client_bytes_down"] += nbytes

    def start(self) -> None:
        """The aggregation begins: the time since the server's download is the clients' training."""
        now = time.perf_counter()
        self.round["client_seconds"] += now - self._last if self._last is not None else 0.0
        self._last = now

    def stop(self) -> dict[str, float]:
        """The aggregation returned: the time since the last send is the server's. Returns the round's
        counters and starts the next round's."""
        if self._last is not None:
            self.round["server_seconds"] += time.perf_counter() - self._last
        self._last = None
        done, self.round = self.round, self._fresh()
        return done

    def transmit(self, tensor, *, sender, receiver, kind):
        self._charge(sender)
        keep, self.recording = self.recording, self.recording and self.keep is None
        try:
            sent, delivered = super().transmit(tensor, sender=sender, receiver=receiver, kind=kind)
        finally:
            self.recording = keep
        self._count(sender, receiver, sent.nbytes)
        if keep and self.keep is not None:
            stacked = [len(n) for n in (sender, receiver) if type(n) is tuple]
            if not stacked:
                if self.keep in (sender, receiver):
                    self._records.append(Record(self.step, sender, receiver, kind, sent.detach().clone(), self.phase))
            else:
                senders = sender if type(sender) is tuple else (sender,) * stacked[0]
                receivers = receiver if type(receiver) is tuple else (receiver,) * stacked[0]
                for i, (s, r) in enumerate(zip(senders, receivers)):
                    if self.keep in (s, r):
                        self._records.append(Record(self.step, s, r, kind, sent[i].detach().clone(), self.phase))
        return sent, delivered

    def broadcast(self, tensor, *, sender, receivers, kind):
        self._charge(sender)
        before = self.total_bytes
        keep, self.recording = self.recording, self.recording and self.keep is None
        try:
            delivered = super().broadcast(tensor, sender=sender, receivers=receivers, kind=kind)
        finally:
            self.recording = keep
        self._count(sender, tuple(receivers), self.total_bytes - before)
        if keep and self.keep is not None and (self.keep == sender or self.keep in receivers):
            to = tuple(receivers) if self.keep == sender else (self.keep,)
            self._records.append(Record(self.step, sender, to, kind, delivered.detach().clone(), self.phase, broadcast=True))
        return delivered


class TimedAggregation(WireAggregator):
    """Runs a scheme's aggregation between the ClockedWire's start and stop (its seconds join the
    round's report); a plain Aggregator gets the updates in the clear, as the engine uploads them."""

    def __init__(self, inner: Any):
        if not callable(getattr(inner, "over_wire", None)) and not callable(inner):
            raise ValueError(f"a scheme must return a WireAggregator or an Aggregator, got {inner!r}")
        self.inner, self.name = inner, getattr(inner, "name", type(inner).__name__)

    def over_wire(self, wire: ClockedWire, uploads: Uploads) -> Aggregate:
        wire.start()
        if callable(getattr(self.inner, "over_wire", None)):
            result = self.inner.over_wire(wire, uploads)
        else:
            before = wire.total_bytes
            received = wire.send(uploads.updates, sender=uploads.names, receiver=SERVER, kind="update")
            result = Aggregate(self.inner(received, uploads.weights), uploads.names, wire.total_bytes - before, 0)
        return replace(result, report={**result.report, **wire.stop()})

    def attach(self, protocol: Any) -> None:
        if callable(getattr(self.inner, "attach", None)):
            self.inner.attach(protocol)

    def manifest(self) -> dict[str, Any]:
        record = getattr(self.inner, "manifest", None)
        return dict(record()) if callable(record) else {"protocol": self.name}

    def report(self) -> dict[str, Any]:
        report = getattr(self.inner, "report", None)
        return dict(report()) if callable(report) else {}

    def __repr__(self) -> str:
        return repr(self.inner)


# -- the probe: what the server received for one client's single-sample update ---------------------
@dataclass
class Probe:
    """One probe round of a scheme (:func:`probe_round`).

    Attributes:
        observed: the attack's input: the server's reading of the target's update (kind ``"update"``)
            and the weights the server sent it; empty when the server could read no update.
        server_view: everything the server received from the target, as it crossed.
        reading: what the server could read (``server_reading``).
        model, input_shape, lr: what the attacker knows (architecture, input shape, the clients' lr).
        truth, label: the target's private sample (1, C, H, W) and label (1,), for scoring only.
        history: the probe round's history row; manifest: the scheme's auditable record.
    """

    scheme: str
    clients: int
    observed: list[Transfer]
    server_view: list[Transfer]
    reading: str
    model: nn.Module
    input_shape: tuple[int, ...]
    lr: float
    truth: Tensor
    label: Tensor
    history: pd.DataFrame
    manifest: dict[str, Any]
    seconds: float = 0.0
    generator: torch.Generator = field(default_factory=torch.Generator)


def _find(record: Any, *keys: str) -> Any:
    """The first value of one of ``keys`` in a (nested) manifest, or None."""
    if isinstance(record, Mapping):
        for key in keys:
            if isinstance(record.get(key), (int, float)) and not isinstance(record.get(key), bool):
                return record[key]
        for value in record.values():
            found = _find(value, *keys)
            if found is not None:
                return found
    return None


def server_reading(transfers: list[Transfer], n_params: int, manifest: Mapping[str, Any]) -> tuple[Tensor | None, str]:
    """What the server can read as one client's update among the ``transfers`` it received from it
    (the last one that fits): a float tensor of ``n_params`` values as is; an integer one as ring
    elements decoded as fixed point (``y >= 2^(bits-1)`` taken as ``y - 2^bits``, divided by
    ``2^frac``; ``frac`` and ``bits``/``ring_bits`` from the manifest, else 16 and the smallest ring
    holding the values). Returns (the (n_params,) float64 reading or None, what was read).

    Example:
        >>> t = Transfer(1, "client:0", "server", "masked", torch.tensor([3, 2**20 - 1]))
        >>> server_reading([t], 2, {"frac": 1, "bits": 20})
        (tensor([ 1.5000, -0.5000], dtype=torch.float64), 'masked (int64 ring 2^20, decoded at 2^-1, 2 values)')
    """
    for t in reversed(transfers):
        x = t.tensor
        if not isinstance(x, Tensor) or x.numel() != n_params:
            continue
        if x.is_floating_point():
            return x.reshape(-1).double(), f"{t.kind} ({str(x.dtype).removeprefix('torch.')}, {n_params:,} values)"
        if not x.is_complex() and x.dtype != torch.bool:
            v = x.reshape(-1).to(torch.int64)
            bits = _find(manifest, "bits", "ring_bits") or max(1, int(v.max()).bit_length())
            frac = _find(manifest, "frac")
            frac = 16 if frac is None else frac
            signed = torch.where(v >= 2 ** (int(bits) - 1), v - 2 ** int(bits), v).double()
            return (signed / 2.0 ** frac, f"{t.kind} ({str(x.dtype).removeprefix('torch.')} ring 2^{int(bits)}, "
                                          f"decoded at 2^-{frac}, {n_params:,} values)")
    seen = ", ".join(f"{t.kind} {t.nbytes:,} B" for t in transfers) or "nothing"
    return None, f"no update it can read (received {seen})"


def client_groups(ds: datasets.Dataset, n: int, seed: int) -> list[Tensor]:
    if n > len(ds.y_train):
        raise ValueError(f"{n} clients need at least {n} training samples, the dataset has {len(ds.y_train)}")
    return datasets.iid(ds.y_train, n, seed=seed)


def probe_round(scheme: Scheme, config: SuiteConfig, n: int, *, name: str = "scheme",
                data: datasets.Dataset | None = None) -> Probe:
    """One round of ``scheme`` for the cohort of ``n`` clients (``fraction * n`` of them), each holding
    the first sample of its share of the data and taking one SGD step at learning rate ``probe_lr``
    (batch 1, one step: the update DLG inverts) from the fresh model; the target is ``client:0``.
    The scheme is built as ``scheme(FedConfig(fraction=1, batch_size=1, lr=probe_lr), m)``."""
    ds = data if data is not None else config.load()
    m = max(1, round(config.fraction * n))
    groups = client_groups(ds, n, config.seed)[:m]
    clients = ClientData.from_indices(ds, [g[:1] for g in groups])
    fed = config.fed_config(fraction=1.0, batch_size=1, lr=config.probe_lr, record=True)
    target = clients.names[0]
    wire = ClockedWire(clients.names, keep=target)
    aggregator = TimedAggregation(scheme(fed, m))
    fl = FederatedAveraging(config.model(ds), clients, test=ds, config=fed, wire=wire, aggregator=aggregator)
    start = time.perf_counter()
    history = fl.fit(rounds=1)
    seconds = time.perf_counter() - start
    view = wire.observed(by=SERVER, sender=target)
    manifest = aggregator.manifest()
    reading, what = server_reading(view, len(fl.weights), manifest)
    observed: list[Transfer] = []
    if reading is not None:
        sent = [t for t in wire.observed(sender=SERVER, kind="weights") if t.receiver == target]
        observed = [Transfer(sent[0].step, target, SERVER, "update", reading.float()), *sent]
    row = groups[0][:1]
    return Probe(name, n, observed, view, what, fl.model, tuple(ds.shape), config.probe_lr, ds.x_train[row],
                 ds.y_train[row], history, manifest, seconds, torch.Generator().manual_seed(config.seed))


def attack_leakage(make_attack: Callable[[nn.Module, tuple[int, ...], float], Any], *,
                   max_steps: int | None = None) -> Callable[[Probe], dict[str, float]]:
    """A ``leakage`` callable from an attack factory ``make_attack(model, input_shape, client_lr)``
    (e.g. ``lambda m, s, lr: DLG(m, input_shape=s, client_lr=lr)``): it runs the attack on the probe's
    ``observed`` with the probe's generator and scores it (:func:`toolkit.metrics.evaluate`: ``mse``,
    ``psnr``, ``ssim``, ``label_accuracy``)."""
    def leakage(probe: Probe) -> dict[str, float]:
        result = make_attack(probe.model, probe.input_shape, probe.lr).run(probe.observed, generator=probe.generator,
                                                                           max_steps=max_steps)
        return metrics.evaluate(result, probe.truth, labels=probe.label)
    return leakage
