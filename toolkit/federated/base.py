"""What every federated protocol shares: clients, the global model, the download and the upload
through the Wire (clients train from the weights the Wire delivered to them; compression,
malicious clients, rejection of NaN updates), local training, evaluation, history, and exact
checkpoint/resume with a manifest."""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from toolkit import validate
from toolkit.federated.aggregators import AGGREGATORS, Aggregator, make_aggregator
from toolkit.federated.clients import ClientData, RoundPlan, plan_round
from toolkit.federated.compression import Compressor
from toolkit.federated.config import LOSSES, FedConfig
from toolkit.federated.executors import make_executor
from toolkit.federated.wire_aggregation import aggregation_manifest
from toolkit.parties import flat_state, load_flat_state
from toolkit.provenance import from_plain, load_checkpoint, manifest, packet_classes, save_checkpoint, to_plain
from toolkit.validate import non_negative_int
from toolkit.wire import Wire

CHECKPOINT_FORMAT = "leaklab-federated-2"  # tensors and plain data only (-1 was a pickle)


class FederatedProtocol:
    """Base of FederatedAveraging, FedAsync and FedBuff (see those for the algorithms).

    Args:
        model: the global model (its current weights are the starting point; it is updated in place).
        clients: one dataset per client (e.g. from :func:`toolkit.data.partition`) or a ClientData;
            class labels for a classification loss, float targets for a regression one
            (``config.loss``), checked once here (see :class:`ClientData`).
        test: a dataset whose ``x_test``/``y_test`` the server evaluates on (default: the first
            client's test split, which partitions share).
        config: a :class:`FedConfig`.
        wire: the Wire updates cross (kind ``"update"``) and weights come down (kind ``"weights"``).
            Clients train from what it delivers: without transforms one broadcast every sampled
            client shares; with transforms a stacked send, one row per sampled client, so a
            per-row transform (noise drawn per client) gives each client its own weights.
        aggregator: name in ``AGGREGATORS`` or an Aggregator (robust aggregation).
        compressor: a Compressor applied to uploads (e.g. ``TopK(0.01)``), or None.
        malicious: client index -> callable rewriting that client's update rows
            (``fn(updates (M, P), generator=...) -> (M, P)``, see ``attacks.poisoning``).

    An aggregator or monitor (see FederatedAveraging) with ``state_dict()``/``load_state_dict()``
    (tensors and plain data) is checkpointed with the protocol.
    """

    name = "federated"
    wire_aggregation = False  # whether a WireAggregator (secure, homomorphic aggregation) can run its rounds

    def __init__(self, model: nn.Module, clients: Sequence | ClientData, *, test: Any = None,
                 config: FedConfig | None = None, wire: Wire | None = None,
                 aggregator: Aggregator | str = "mean", compressor: Compressor | None = None,
                 malicious: Mapping[int, Callable[..., Tensor]] | None = None):
        self.config = config or FedConfig()
        if not isinstance(self.config, FedConfig):
            raise TypeError(f"config must be a FedConfig, got {type(self.config).__name__}")
        self.loss = LOSSES[self.config.loss]
        regression = not self.loss.classification
        self.model = model
        self.data = clients if isinstance(clients, ClientData) else ClientData(clients, regression=regression)
        if self.data.regression != regression:
            raise ValueError(f"loss {self.config.loss!r} needs {'float targets' if regression else 'class labels'}, "
                             f"but the ClientData holds {'float targets' if self.data.regression else 'class labels'}: "
                             f"build it with ClientData(..., regression={regression})")
        test = test if test is not None else (clients[0] if not isinstance(clients, ClientData) else None)
        if test is None or not hasattr(test, "x_test"):
            raise ValueError("the server needs a test set: pass test=<a dataset with x_test and y_test>")
        self.x_test, self.y_test = self._check_test(test.x_test, test.y_test)
        self.wire = wire if wire is not None else Wire(record=self.config.record)
        if isinstance(aggregator, str):
            if aggregator not in AGGREGATORS:
                raise ValueError(f"unknown aggregator {aggregator!r}; choose one of {sorted(AGGREGATORS)}")
            aggregator = make_aggregator(aggregator)
        self.aggregator = aggregator
        if callable(getattr(aggregator, "over_wire", None)) and not self.wire_aggregation:
            raise ValueError(f"{aggregator!r} runs a synchronous protocol round over the Wire: use it with "
                             f"FederatedAveraging, not {type(self).__name__}")
        if compressor is not None and callable(getattr(aggregator, "over_wire", None)):
            raise ValueError(f"{aggregator!r} sends its own messages over the Wire (masked or encrypted "
                             f"inputs): it cannot be combined with a compressor ({compressor!r})")
        self.compressor = compressor
        self.malicious = dict(malicious or {})
        bad = [c for c in self.malicious if not 0 <= c < len(self.data)]
        if bad:
            raise ValueError(f"malicious client indices {bad} are not clients (there are {len(self.data)})")
        self.monitors: list[Callable[..., Mapping[str, Any]]] = []  # FederatedAveraging's
        self.executor = make_executor(self.config)
        self.weights = flat_state(model).clone()  # (P,) global weights: parameters, then floating buffers
        self._check_model()
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.round = 0
        self.history = pd.DataFrame()

    def _check_test(self, x: Any, y: Any) -> tuple[Tensor, Tensor]:
        """The server's test set, checked like the clients' data."""
        x = validate.finite(validate.tensor(x, "x_test", min_dim=1), "x_test")
        if self.loss.classification:
            y = validate.labels(y, "y_test", length=len(x))
        else:
            y = validate.finite(validate.tensor(y, "y_test", min_dim=1), "y_test")
            if not y.is_floating_point() or len(y) != len(x) or y.shape[1:] != self.data.y.shape[2:]:
                raise ValueError(f"y_test must hold one float target {tuple(self.data.y.shape[2:])} per test input, "
                                 f"got {tuple(y.shape)} {y.dtype} for {len(x)} inputs")
        if tuple(x.shape[1:]) != self.data.shape:
            raise ValueError(f"x_test holds inputs of shape {tuple(x.shape[1:])}, the clients' are {self.data.shape}")
        return x, y

    def _check_model(self) -> None:
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("the model has no parameter to train (every requires_grad is False)")
        if self.config.per_sample_dp:
            for name, module in self.model.named_modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    raise ValueError(f"per-sample DP-SGD needs each sample's own gradient, but {name} "
                                     f"({type(module).__name__}) mixes the samples of a batch: use GroupNorm")
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()  # no BatchNorm statistics change
        try:
            with torch.no_grad():
                out = self.model(self.data.x[0, :2])
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"the model cannot take the clients' inputs of shape {self.data.shape}: {err}") from None
        finally:
            for m, mode in modes:
                m.train(mode)
        if not self.loss.classification:
            target = self.data.y.shape[2:].numel()
            if out[0].numel() != target:
                raise ValueError(f"the model outputs {tuple(out.shape[1:])} per sample but the targets hold "
                                 f"{tuple(self.data.y.shape[2:])} ({target} values)")
            return
        n_classes = max(int(self.data.y.max()), int(self.y_test.max()) if len(self.y_test) else 0) + 1
        if out.dim() != 2 or out.shape[1] < n_classes:
            raise ValueError(f"the model outputs {tuple(out.shape[1:])} per sample but the labels have "
                             f"{n_classes} classes")

    # -- one client round trip ---------------------------------------------------------------
    def _plan(self, clients: Tensor | None = None) -> RoundPlan:
        c = self.config
        return plan_round(self.data, fraction=c.fraction, dropout=c.dropout, epochs=c.local_epochs,
                          generator=self.generator, clients=clients)

    def _download(self, weights: Tensor, plan: RoundPlan) -> tuple[Tensor, int]:
        """Send ``weights`` (P,) to every sampled client, dropped ones included (they were sent
        them). Returns (what the training clients received: (P,) when all got the same, else
        (M, P) in plan order; bytes down).

        Without transforms on the wire one broadcast serves everyone; with transforms the server
        sends a stacked tensor, one row per receiver, so a per-row transform gives each client its
        own weights. Both count the same bytes."""
        sampled = plan.sampled_clients
        names = tuple(self.data.names[i] for i in sampled.tolist())
        if not names:
            return weights, 0
        before = self.wire.total_bytes
        if not self.wire.transforms:
            received = self.wire.broadcast(weights, sender="server", receivers=names, kind="weights")
            return received, self.wire.total_bytes - before
        rows = self.wire.send(weights.expand(len(names), len(weights)), sender="server", receiver=names,
                              kind="weights")
        if not isinstance(rows, Tensor) or rows.shape != (len(names), len(weights)):
            shape = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
            raise ValueError(f"the wire's transforms turned the weights for {len(names)} clients, "
                             f"({len(names)}, {len(weights)}), into {shape}: a transform on kind 'weights' "
                             f"must keep the shape")
        if rows.stride(0) == 0 or len(rows) == 1:  # one row, or all rows one tensor (no transform touched them)
            return rows[0], self.wire.total_bytes - before
        return rows[torch.searchsorted(sampled, plan.clients)], self.wire.total_bytes - before

    def _local_train(self, start: Tensor, plan: RoundPlan, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The training clients' updates (M, P), each relative to the weights it received
        (``start``: (P,) or (M, P), from :meth:`_download`), after malicious clients rewrote
        theirs (written into ``out`` when given)."""
        # A model's own random layers (dropout) draw from torch's global RNG: give it a stream fixed
        # by the config's seed and where the run is, so same seed, same numbers (and exact resume).
        first = int(plan.clients[0]) if len(plan.clients) else 0
        stream = (self.config.seed * 1_000_003 + self.wire.step * 7_919 + self.round * 104_729 + first) % 2**62
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream)
            # the protocol's generator draws per-sample DP-SGD noise; executors written before it get no keyword
            noise = {"generator": self.generator} if self.config.dp_noise_multiplier else {}
            updates, losses = self.executor.train(self.model, start, self.data, plan, self.config, out, **noise)
        load_flat_state(self.model, self.weights)
        for fn in {id(f): f for f in self.malicious.values()}.values():
            bad = torch.tensor([c for c, f in self.malicious.items() if f is fn])
            rows = torch.isin(plan.clients, bad).nonzero().flatten()
            if len(rows):
                forged = fn(updates[rows], generator=self.generator)
                if not isinstance(forged, Tensor) or forged.shape != (len(rows), updates.shape[1]):
                    shape = tuple(forged.shape) if isinstance(forged, Tensor) else type(forged).__name__
                    raise ValueError(f"mismatched parameter shapes: malicious {fn!r} returned {shape} for "
                                     f"clients {plan.clients[rows].tolist()}, expected ({len(rows)}, {updates.shape[1]})")
                updates[rows] = forged
        return updates, losses

    def _upload(self, updates: Tensor, clients: Tensor) -> tuple[Tensor, Tensor, int]:
        """Clients send their updates over the wire (compressed if set); the server drops rows
        with NaN or Inf, with a warning. Returns (received rows kept, their clients, bytes up)."""
        before = self.wire.total_bytes
        names = tuple(self.data.names[i] for i in clients.tolist())
        if self.compressor is not None:
            # A non-finite update cannot be encoded (top-k and QSGD of NaN are undefined): it is
            # rejected before compression, so it neither crosses nor enters error-feedback memory.
            finite = _finite_rows(updates)
            rejected = [names[i] for i in (~finite).nonzero().flatten().tolist()]
            if rejected:
                updates, clients = updates[finite], clients[finite]
                names = tuple(n for n, ok in zip(names, finite.tolist()) if ok)
            if len(clients):
                packet = self.compressor.compress(updates, clients, generator=self.generator)
                received = self.compressor.decompress(self.wire.send(packet, sender=names, receiver="server",
                                                                     kind="update"))
            else:
                received = updates  # (0, P): nothing left to send
        else:
            received = self.wire.send(updates, sender=names, receiver="server", kind="update")
            finite = _finite_rows(received)
            rejected = [names[i] for i in (~finite).nonzero().flatten().tolist()]
            received, clients = (received[finite], clients[finite]) if rejected else (received, clients)
        if rejected:
            warnings.warn(f"round {self.round + 1}: dropped non-finite (NaN/Inf) updates from {rejected}",
                          RuntimeWarning, stacklevel=3)
        return received, clients, self.wire.total_bytes - before

    def _reports(self, plan: RoundPlan) -> dict[str, Any]:
        """The history columns the wire's transforms, the aggregator's ``report()`` and the monitors
        give for this round."""
        row: dict[str, Any] = self.wire.reports()  # wire transforms' (e.g. local DP's epsilon)
        report = getattr(self.aggregator, "report", None)
        if callable(report):
            row.update(report())
        for monitor in self.monitors:
            row.update(monitor(self, plan))
        return row

    def _parts(self) -> dict[str, Any]:
        """The aggregator and monitors that keep state, by checkpoint key."""
        parts = {"aggregator": self.aggregator, **{f"monitor {i}": m for i, m in enumerate(self.monitors)}}
        return {k: p for k, p in parts.items() if callable(getattr(p, "state_dict", None))}

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Test loss (the configured loss) of the global model on the server's test set, and
        its accuracy for a classification loss."""
        load_flat_state(self.model, self.weights)
        self.model.eval()
        loss, correct = 0.0, 0
        for lo in range(0, len(self.y_test), self.config.eval_batch_size):
            x = self.x_test[lo:lo + self.config.eval_batch_size]
            y = self.y_test[lo:lo + self.config.eval_batch_size]
            out = self.model(x)
            loss += float(self.loss.per_sample(out, y).sum())
            if self.loss.classification:
                correct += int((out.argmax(1) == y).sum())
        self.model.train()
        n = max(1, len(self.y_test))
        return {"test_loss": loss / n, "accuracy": correct / n} if self.loss.classification else {"test_loss": loss / n}

    def _record(self, rows: list[dict[str, Any]]) -> pd.DataFrame:
        frame = pd.DataFrame(rows)
        self.history = pd.concat([self.history, frame], ignore_index=True) if len(self.history) else frame
        frame.attrs["manifest"] = self.history.attrs["manifest"] = self.manifest()
        return frame

    # -- provenance ----------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        """Versions, seed, full config and the protocol's parts, for tracing a result."""
        return manifest(self.config, protocol=type(self).__name__, round=self.round,
                        executor=self._executor_ran(), executor_fallback=getattr(self.executor, "fallback", None),
                        aggregator=repr(self.aggregator), compressor=repr(self.compressor),
                        aggregation=aggregation_manifest(self.aggregator),
                        malicious={c: repr(f) for c, f in self.malicious.items()},
                        clients=len(self.data), parameters=len(self.weights))

    def _extra_state(self) -> dict[str, Any]:
        """What a subclass adds to the checkpoint: tensors and plain data only (encode objects with
        :func:`toolkit.provenance.to_plain`)."""
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_extra_state` saved; raise a ValueError for anything malformed
        (:meth:`load` then puts the protocol back as it was)."""

    def _check_like_weights(self, what: str, tensors: Mapping[str, Any]) -> None:
        """Refuse checkpointed tensors that are not one value per weight (they would broadcast)."""
        for name, t in tensors.items():
            if type(t) is not Tensor or t.shape != self.weights.shape or not t.is_floating_point():
                got = f"shape {tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else f"a {type(t).__name__}"
                raise ValueError(f"the checkpoint's {what} {name} has {got}, expected one value per weight, "
                                 f"shape {tuple(self.weights.shape)}")

    def _checkpoint_state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT, "protocol": type(self).__name__, "round": self.round,
            "config": asdict(self.config), "weights": self.weights.clone(),
            "generator": self.generator.get_state(), "history": self.history.to_dict("list"),
            "wire": to_plain(self.wire.state_dict(), packet_classes()), "clients": len(self.data),
            "manifest": self.manifest(),
            "compressor": self.compressor.state_dict() if self.compressor is not None else None,
            "parts": {k: p.state_dict() for k, p in self._parts().items()},
            **self._extra_state(),
        }

    def save(self, path: str | Path) -> Path:
        """Checkpoint everything a resumed run needs to continue exactly (atomic write), as tensors
        and plain data only: :meth:`load` reads it without unpickling any object."""
        return save_checkpoint(self._checkpoint_state(), path)

    def load(self, path: str | Path) -> None:
        """Restore a checkpoint into this (identically built) protocol.

        Reads it with ``torch.load(weights_only=True)`` (nothing in the file runs) and refuses,
        with a ValueError naming the problem, a file that is not a LeakLab checkpoint, an old
        pickled one, another protocol's, or one made with another model, client count or config;
        a refused checkpoint leaves this protocol exactly as it was.
        """
        state = load_checkpoint(path, CHECKPOINT_FORMAT)
        if state.get("protocol") != type(self).__name__:
            raise ValueError(f"{path} holds a {state.get('protocol')} checkpoint, not {type(self).__name__}")
        weights = state.get("weights")
        if type(weights) is not Tensor or weights.dim() != 1 or len(weights) != len(self.weights):
            got = len(weights) if isinstance(weights, Tensor) and weights.dim() == 1 else "no vector of"
            raise ValueError(f"mismatched parameter shapes: the checkpoint holds {got} weights, "
                             f"this model has {len(self.weights)}")
        if weights.dtype != self.weights.dtype:
            raise ValueError(f"the checkpoint's weights are {weights.dtype}, this model's are {self.weights.dtype}")
        if state.get("clients") != len(self.data):
            raise ValueError(f"the checkpoint was made with {state.get('clients')} clients, this run has {len(self.data)}")
        mine, theirs = asdict(self.config), state.get("config")
        theirs = {k: tuple(v) if type(v) is list else v for k, v in theirs.items()} if type(theirs) is dict else {}
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k, None) != theirs.get(k, None))
        if diff:
            raise ValueError(f"the checkpoint's config differs in {diff}: build the protocol with the same config")
        previous, history, model = self._checkpoint_state(), self.history, flat_state(self.model).clone()
        try:
            self._restore(state)
        except Exception as err:
            self._restore(previous)  # as it was: the checkpoint is refused as a whole
            self.history = history
            load_flat_state(self.model, model)
            if isinstance(err, ValueError):
                raise ValueError(f"{path} was refused: {err}") from None
            if isinstance(err, KeyError):
                raise ValueError(f"{path} is not a usable LeakLab checkpoint: it lacks the field {err}") from None
            raise ValueError(f"{path} is not a usable LeakLab checkpoint ({type(err).__name__}: {err}); "
                             f"nothing was loaded") from None

    def _restore(self, state: dict[str, Any]) -> None:
        if type(state["history"]) is not dict:
            raise ValueError(f"the checkpoint's history must be a dict of columns, got {type(state['history']).__name__}")
        self.round = non_negative_int("the checkpoint's round", state["round"])
        self.weights = state["weights"].clone()
        load_flat_state(self.model, self.weights)
        self.generator.set_state(state["generator"])
        self.history = pd.DataFrame(state["history"])
        self.wire.load_state_dict(from_plain(state["wire"], packet_classes(), what="the wire transcript"))
        if self.compressor is not None:
            if state["compressor"] is None:
                raise ValueError(f"the checkpoint has no compressor state, this run compresses with {self.compressor!r}")
            self.compressor.load_state_dict(state["compressor"])
        elif state["compressor"] is not None:
            raise ValueError("the checkpoint holds a compressor's state, this run has no compressor")
        parts, saved = self._parts(), state.get("parts", {})
        if type(saved) is not dict or set(saved) != set(parts):
            raise ValueError(f"the checkpoint holds the state of {sorted(saved) if type(saved) is dict else saved!r}, "
                             f"this run's stateful parts are {sorted(parts)}")
        for key, part in parts.items():
            part.load_state_dict(saved[key])
        self._load_extra_state(state)

    def _executor_ran(self) -> str:
        """The executor that trained the last round (the configured one before any round)."""
        return getattr(self.executor, "ran", None) or self.executor.name

    def __repr__(self) -> str:
        ran = self._executor_ran()
        executor = ran if ran == self.executor.name else f"{ran} ({self.executor.name} fell back)"
        return (f"{type(self).__name__}({self.data!r}, round {self.round}, executor={executor}, "
                f"aggregator={self.aggregator!r}, compressor={self.compressor!r}, "
                f"{len(self.malicious)} malicious)")


def _finite_rows(rows: Tensor) -> Tensor:
    """(M,) True where a row of ``rows`` (M, P) holds no NaN or Inf."""
    finite = torch.isfinite(rows.sum(dim=1))  # (M,) a NaN/Inf makes its row's sum non-finite
    if not bool(finite.all()):
        suspect = (~finite).nonzero().flatten()
        finite[suspect] = torch.isfinite(rows[suspect]).all(dim=1)  # rows that merely overflowed
    return finite
