"""Checkpoints hold tensors and plain data only: a crafted pickle never runs, a refused file leaves
the protocol exactly as it was, saving stays atomic, and shared objects stay shared."""
import dataclasses
import os
import re
import shlex

import pytest
import torch

from toolkit import models
from toolkit.federated import FedConfig, FederatedAveraging
from toolkit.federated.asynchronous import FedAsync, FedBuff
from toolkit.federated.base import CHECKPOINT_FORMAT
from toolkit.federated.compression import TopK
from toolkit import provenance


def mlp():
    torch.manual_seed(0)
    return models.mlp([64, 128, 10])


class _Payload:
    """Unpickling this runs a (harmless) shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@dataclasses.dataclass
class _OldTask:  # stands in for the dataclass objects that old (pickled) checkpoints held
    finish: float


def snapshot(fl):
    """What a load could change, copied (to compare before and after a refused load)."""
    return {"round": fl.round, "weights": fl.weights.clone(), "generator": fl.generator.get_state(),
            "history": fl.history.copy(), "bytes": fl.wire.total_bytes, "records": len(fl.wire.observed()),
            "model": torch.cat([p.detach().reshape(-1) for p in fl.model.parameters()])}


def assert_same(before, fl):
    after = snapshot(fl)
    assert after["round"] == before["round"] and after["bytes"] == before["bytes"]
    assert after["records"] == before["records"]
    for key in ("weights", "generator", "model"):
        assert torch.equal(after[key], before[key]), key
    assert after["history"].equals(before["history"])


@pytest.fixture
def trained(iid10):
    fl = FederatedAveraging(mlp(), iid10, config=FedConfig(fraction=0.5))
    fl.fit(rounds=1)
    return fl


# -- refusing what is not a LeakLab checkpoint ------------------------------------------------------
def test_a_crafted_pickle_checkpoint_is_refused_and_its_payload_never_runs(tmp_path, trained):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "protocol": "FederatedAveraging", "payload": _Payload(marker)}, path)
    before = snapshot(trained)
    message = rf"{re.escape(str(path))} is not a LeakLab checkpoint: it holds objects other than tensors and plain data"
    with pytest.raises(ValueError, match=message):
        trained.load(path)
    assert not marker.exists()
    with pytest.raises(ValueError, match=message):
        provenance.load_checkpoint(path)
    assert not marker.exists()
    assert_same(before, trained)


@pytest.mark.parametrize("content", [b"not a checkpoint at all", None, [1, 2], {"format": "something-else"},
                                     {"weights": torch.zeros(3)}], ids=["bytes", "none", "list", "format", "no-format"])
def test_a_file_that_is_not_a_leaklab_checkpoint_is_refused(tmp_path, trained, content):
    path = tmp_path / "other.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    before = snapshot(trained)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is not a LeakLab checkpoint"):
        trained.load(path)
    assert_same(before, trained)


@pytest.mark.parametrize("pickled", [True, False], ids=["with-objects", "plain"])
def test_an_old_pickled_checkpoint_is_refused_with_a_message_to_re_create_it(tmp_path, trained, pickled):
    path = tmp_path / "old.pt"
    state = {"format": "leaklab-federated-1", "protocol": "FederatedAveraging", "weights": trained.weights.clone()}
    if pickled:
        state["queue"] = [_OldTask(1.5)]
    torch.save(state, path)
    before = snapshot(trained)
    with pytest.raises(ValueError, match=r"leaklab-federated-1.*pickle.*cannot be loaded safely: re-create it"):
        trained.load(path)
    assert_same(before, trained)


# -- a checkpoint refused halfway leaves the protocol as it was ------------------------------------
def _fedavg(clients):
    return FederatedAveraging(mlp(), clients, compressor=TopK(0.1),
                              config=FedConfig(fraction=0.5, server_optimizer="fedadam", server_lr=0.01, record=False))


def _fedbuff(clients):
    return FedBuff(mlp(), clients, config=FedConfig(fraction=0.5, server_optimizer="fedavgm"), buffer_size=3)


def _fedasync(clients):
    return FedAsync(mlp(), clients, config=FedConfig(fraction=0.5))


def _bad_residual(state):
    state["compressor"] = {"residual": torch.zeros(5)}  # 1-D: not a (clients, weights) memory


def _bad_velocity(state):
    state["server_optimizer"] = {"velocity": torch.zeros(1)}  # would broadcast over every weight


def _one_task_too_many(state):
    for snapshot in state["events"]["value"]["snapshots"].values():
        snapshot[1] += 1  # [weights, tasks still out]


def _unknown_class(state):
    state["events"]["objects"][0]["class"] = "subprocess.Popen"


TAMPERED = {"fedavg-residual": (_fedavg, _bad_residual, "residual must be a 2-D"),
            "fedbuff-velocity": (_fedbuff, _bad_velocity, r"velocity.*shape \(1,\).*\(\d+,\)"),
            "fedbuff-snapshots": (_fedbuff, _one_task_too_many, "tasks out per version"),
            "fedasync-class": (_fedasync, _unknown_class, "subprocess.Popen")}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_checkpoint_refused_halfway_leaves_the_protocol_as_it_was(tmp_path, iid10, case):
    build, tamper, message = TAMPERED[case]
    source = build(iid10)
    source.fit(rounds=2)
    path = source.save(tmp_path / "run.pt")
    state = torch.load(path, weights_only=True)  # plain data: safe to read and edit
    tamper(state)
    torch.save(state, path)
    victim, twin = build(iid10), build(iid10)
    victim.fit(rounds=1)
    twin.fit(rounds=1)
    before = snapshot(victim)
    with pytest.raises(ValueError, match=message):
        victim.load(path)
    assert_same(before, victim)
    # ... and it goes on exactly like a twin that never tried to load
    victim.fit(rounds=2)
    twin.fit(rounds=2)
    assert torch.equal(victim.weights, twin.weights)
    assert torch.equal(victim.generator.get_state(), twin.generator.get_state())
    cols = [c for c in twin.history.columns if c != "seconds"]
    assert victim.history[cols].equals(twin.history[cols])


def test_a_mismatched_checkpoint_leaves_the_protocol_as_it_was(tmp_path, iid10, trained):
    path = trained.save(tmp_path / "run.pt")
    other = FederatedAveraging(mlp(), iid10, config=FedConfig(fraction=0.5, lr=0.2))
    other.fit(rounds=2)
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"config differs in \['lr'\]"):
        other.load(path)
    assert_same(before, other)


def test_tasks_dispatched_together_share_their_batch_after_a_resume(tmp_path, iid10):
    fl = FedBuff(mlp(), iid10, config=FedConfig(fraction=0.5), buffer_size=3)
    fl.fit(rounds=1)  # five clients left together and three arrived: two still share the (trained) batch
    shared = [t for t in fl._queue if t.batch is fl._queue[0].batch]
    assert len(shared) == 2 and shared[0].batch.updates is not None, fl._queue
    resumed = FedBuff(mlp(), iid10, config=FedConfig(fraction=0.5), buffer_size=3)
    resumed.load(fl.save(tmp_path / "run.pt"))
    again = [t for t in resumed._queue if t.batch is resumed._queue[0].batch]
    assert [t.seq for t in again] == [t.seq for t in shared]
    assert len({id(t.batch) for t in resumed._queue}) == len({id(t.batch) for t in fl._queue})
    assert torch.equal(again[0].batch.updates, shared[0].batch.updates)
    fl.fit(rounds=2)
    resumed.fit(rounds=2)
    assert torch.equal(fl.weights, resumed.weights)


# -- what a checkpoint may hold ---------------------------------------------------------------------
def test_save_refuses_state_that_is_not_plain_data_and_keeps_the_old_file(tmp_path):
    path = provenance.save_checkpoint({"format": "test-1", "weights": torch.ones(3)}, tmp_path / "run.pt")
    old = path.read_bytes()
    with pytest.raises(TypeError, match=r"state\['extra'\]\[1\] is a _OldTask"):
        provenance.save_checkpoint({"format": "test-1", "extra": [1, _OldTask(2.0)]}, path)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]  # no temporary file left behind


def test_a_crash_mid_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = provenance.save_checkpoint({"format": "test-1", "weights": torch.ones(3)}, tmp_path / "run.pt")
    old = path.read_bytes()

    def crash(state, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(provenance.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        provenance.save_checkpoint({"format": "test-1", "weights": torch.zeros(3)}, path)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]


@dataclasses.dataclass
class _Shared:
    name: str
    values: torch.Tensor


@dataclasses.dataclass
class _User:
    shared: _Shared
    row: int


CLASSES = {"_Shared": _Shared, "_User": _User}


def test_plain_encoding_keeps_shared_objects_shared_and_loads_without_pickle(tmp_path):
    shared = _Shared("batch", torch.arange(4.0))
    value = {"queue": [_User(shared, 0), _User(shared, 1), _User(_Shared("other", torch.ones(2)), 0)], "n": 3}
    encoded = provenance.to_plain(value, CLASSES)
    assert len(encoded["objects"]) == 5  # two _Shared and three _User, each once
    path = provenance.save_checkpoint({"format": "test-1", "value": encoded}, tmp_path / "run.pt")
    loaded = provenance.load_checkpoint(path)
    back = provenance.from_plain(loaded["value"], CLASSES, what="the queue")
    assert back["n"] == 3 and [u.row for u in back["queue"]] == [0, 1, 0]
    assert back["queue"][0].shared is back["queue"][1].shared is not back["queue"][2].shared
    assert torch.equal(back["queue"][1].shared.values, torch.arange(4.0))


def test_plain_encoding_refuses_what_it_may_not_rebuild():
    with pytest.raises(TypeError, match=r"state\['x'\] is a _Shared.*\['_User'\]"):
        provenance.to_plain({"x": _Shared("a", torch.ones(1))}, {"_User": _User})
    with pytest.raises(ValueError, match="reserved key"):
        provenance.to_plain({provenance.OBJECT_KEY: 1}, CLASSES)
    good = provenance.to_plain([_User(_Shared("a", torch.ones(1)), 0)], CLASSES)

    def edited(fn):
        data = {"objects": [dict(o, fields=dict(o["fields"])) for o in good["objects"]], "value": list(good["value"])}
        fn(data)
        return data

    cases = [
        (lambda d: d["objects"][0].update({"class": "os.system"}), r"unknown class 'os.system'"),
        (lambda d: d["objects"][1]["fields"].pop("row"), r"_User.*fields \['row'\] missing"),
        (lambda d: d["objects"][1]["fields"].update(extra=1), r"_User.*unknown fields \['extra'\]"),
        (lambda d: d["objects"][0]["fields"].update(values={provenance.OBJECT_KEY: 1}), "refers to object 1"),
        (lambda d: d.update(value=[{provenance.OBJECT_KEY: 7}]), "refers to object 7"),
        (lambda d: d.pop("objects"), "not encoded plain data"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=rf"the queue.*{message}"):
            provenance.from_plain(edited(fn), CLASSES, what="the queue")
