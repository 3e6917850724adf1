import dataclasses

import pytest
import torch

from toolkit.wire import Packet, Transfer, Wire


def send_batch(wire, step_tensors):
    for t in step_tensors:
        wire.tick()
        wire.send(t, sender="client", receiver="server", kind="activations")


def test_send_records_a_detached_copy_with_its_stamp():
    wire = Wire()
    wire.tick()
    z = torch.ones(4, 3, requires_grad=True) * 2
    got = wire.send(z, sender="client", receiver="server", kind="activations")
    assert not got.requires_grad and torch.equal(got, z.detach())
    (tr,) = wire.observed(by="server")
    assert (tr.step, tr.sender, tr.receiver, tr.kind, tr.phase) == (1, "client", "server", "activations", "train")
    assert not tr.tensor.requires_grad
    got.mul_(0)  # the receiver scribbling on its tensor does not change the record
    assert torch.equal(tr.tensor, torch.full((4, 3), 2.0))


def test_bytes_are_numel_times_itemsize_and_summary_matches_transcript():
    wire = Wire()
    wire.send(torch.zeros(8, 5), sender="client", receiver="server", kind="activations")           # 160 B
    wire.send(torch.zeros(8, dtype=torch.int64), sender="client", receiver="server", kind="labels")  # 64 B
    wire.send(torch.zeros(8, 5, dtype=torch.float64), sender="server", receiver="client", kind="gradients")  # 320 B
    assert wire.total_bytes == 160 + 64 + 320
    assert sum(t.nbytes for t in wire.observed()) == wire.total_bytes
    summary = wire.summary().set_index("party")
    assert summary.loc["client", "bytes_up"] == 224 and summary.loc["client", "bytes_down"] == 320
    assert summary.loc["server", "bytes_up"] == 320 and summary.loc["server", "bytes_down"] == 224
    assert summary["bytes_up"].sum() == summary["bytes_down"].sum() == wire.total_bytes
    assert len(wire) == 3


def test_recording_off_still_counts_bytes():
    wire = Wire(record=False)
    send_batch(wire, [torch.zeros(2, 2)] * 3)
    assert wire.observed() == [] and wire.total_bytes == 48 and len(wire) == 3


def test_observed_filters_by_receiver_kind_sender_and_phase():
    wire = Wire()
    wire.send(torch.zeros(1), sender="a", receiver="b", kind="activations")
    wire.send(torch.zeros(2), sender="b", receiver="a", kind="gradients")
    with wire.during("eval"):
        wire.send(torch.zeros(3), sender="c", receiver="b", kind="activations")
    assert [t.tensor.numel() for t in wire.observed(by="b")] == [1, 3]
    assert [t.tensor.numel() for t in wire.observed(kind="gradients")] == [2]
    assert [t.tensor.numel() for t in wire.observed(by="b", sender="c")] == [3]
    assert [t.tensor.numel() for t in wire.observed(phase="train")] == [1, 2]
    assert wire.phase == "train"


def test_transforms_apply_in_order_and_see_the_kind():
    seen = []

    def double(t, *, kind):
        seen.append(kind)
        return t * 2 if kind == "activations" else t

    def plus_one(t, *, kind):
        return t + 1 if kind == "activations" else t

    wire = Wire([double, plus_one])
    got = wire.send(torch.ones(2), sender="c", receiver="s", kind="activations")
    kept = wire.send(torch.ones(2), sender="s", receiver="c", kind="gradients")
    assert got.tolist() == [3.0, 3.0] and kept.tolist() == [1.0, 1.0]
    assert wire.observed(by="s")[0].tensor.tolist() == [3.0, 3.0]  # the record is what crossed
    assert seen == ["activations", "gradients"]


def test_stacked_send_counts_one_transfer_per_row():
    wire = Wire()
    names = tuple(f"client:{i}" for i in range(100))
    updates = torch.arange(100 * 4, dtype=torch.float32).reshape(100, 4)
    wire.send(updates, sender=names, receiver="server", kind="update")
    assert len(wire) == 100 and wire.total_bytes == 100 * 16
    seen = wire.observed(by="server", kind="update")
    assert len(seen) == 100 and seen[7].sender == "client:7" and seen[7].tensor.tolist() == [28, 29, 30, 31]
    assert wire.observed(by="server", sender="client:42")[0].tensor[0] == 168
    summary = wire.summary().set_index("party")
    assert summary.loc["client:3", "bytes_up"] == 16 and summary.loc["server", "bytes_down"] == 1600
    back = wire.send(updates.sum(0).expand(100, -1), sender="server", receiver=names, kind="weights")
    assert back.shape == (100, 4) and len(wire.observed(by="client:5")) == 1


@pytest.mark.parametrize("sender,receiver,shape", [
    (("a", "b"), "s", (3, 4)),          # two senders, three rows
    (("a", "b"), ("s", "t", "u"), (2, 4)),  # unequal tuples
    ("a", ("s", "t"), ()),              # scalar for two receivers
])
def test_stacked_send_with_wrong_rows_is_refused(sender, receiver, shape):
    wire = Wire()
    with pytest.raises(ValueError, match="rows|one to one"):
        wire.send(torch.zeros(shape), sender=sender, receiver=receiver, kind="update")
    assert len(wire) == 0 and wire.total_bytes == 0  # nothing half-counted


def test_bad_transform_and_bad_names_are_refused():
    with pytest.raises(TypeError, match="callables"):
        Wire([42])
    with pytest.raises(TypeError, match="names"):
        Wire().send(torch.zeros(1), sender=3, receiver="s", kind="x")


def test_reset_and_repr():
    wire = Wire()
    send_batch(wire, [torch.zeros(1)])
    assert "1 transfers" in repr(wire)
    wire.reset()
    assert len(wire) == 0 and wire.total_bytes == 0 and wire.observed() == [] and wire.step == 0
    assert "activations (1,) float32, 4 B" in repr(Transfer(1, "c", "s", "activations", torch.zeros(1)))


def test_broadcast_counts_every_receiver_in_full_and_records_once():
    wire = Wire()
    names = tuple(f"client:{i}" for i in range(50))
    got = wire.broadcast(torch.ones(10), sender="server", receivers=names, kind="weights")
    assert got.shape == (10,) and wire.total_bytes == 50 * 40 and len(wire) == 50
    assert len(wire._records) == 1  # one copy kept, not fifty
    seen = wire.observed(by="client:7")
    assert len(seen) == 1 and seen[0].tensor.shape == (10,) and seen[0].sender == "server"
    summary = wire.summary().set_index("party")
    assert summary.loc["server", "bytes_up"] == 2000 and summary.loc["client:49", "bytes_down"] == 40
    with pytest.raises(TypeError, match="receiver names"):
        wire.broadcast(torch.ones(1), sender="server", receivers=[], kind="weights")


@dataclasses.dataclass
class Sparse(Packet):
    indices: torch.Tensor
    values: torch.Tensor
    size: int  # metadata: known to both sides, not counted


def test_packets_are_counted_byte_for_byte_and_split_by_row():
    wire = Wire()
    packet = Sparse(torch.zeros(3, 5, dtype=torch.int16), torch.ones(3, 5), size=100)
    assert packet.nbytes == 3 * 5 * 2 + 3 * 5 * 4
    names = ("a", "b", "c")
    got = wire.send(packet, sender=names, receiver="server", kind="update")
    assert isinstance(got, Sparse) and wire.total_bytes == 90
    row = wire.observed(by="server", sender="b")[0]
    assert isinstance(row.tensor, Sparse) and row.tensor.values.shape == (5,) and row.tensor.size == 100
    assert row.nbytes == 30 and "Sparse(indices (5,) int16" in repr(row)
    packet.values.mul_(7)  # the record is a copy
    assert float(row.tensor.values.sum()) == 5.0
    with pytest.raises(ValueError, match="2 rows, got 3"):
        wire.send(packet, sender=("a", "b"), receiver="server", kind="update")


def test_load_state_dict_refuses_a_malformed_state_and_keeps_the_wire():
    wire = Wire()
    wire.send(torch.ones(2, 3), sender="c", receiver="s", kind="activations")
    good = wire.state_dict()
    fresh = Wire()
    fresh.load_state_dict(good)
    assert fresh.observed()[0].tensor.tolist() == [[1.0] * 3] * 2 and fresh.total_bytes == 24
    bad_record = {**good, "records": [(0, "c", "s", "activations", "not a tensor", "train", False)]}
    bad_ledger = {**good, "ledger": [(("c", "s"), [1, 24])]}
    for bad, message in ((bad_record, "record 0"), (bad_ledger, "ledger entry 0"),
                         ({**good, "step": -1}, "step must be a non-negative int"), ({"step": 0}, "not a wire state")):
        target = Wire()
        target.send(torch.zeros(1), sender="a", receiver="b", kind="labels")
        with pytest.raises(ValueError, match=message):
            target.load_state_dict(bad)
        assert len(target.observed()) == 1 and target.total_bytes == 4  # unchanged


def test_a_stacked_send_of_one_expanded_row_is_recorded_once_and_reads_the_same():
    wire = Wire()
    w = torch.arange(4.0)
    wire.send(w.expand(3, 4), sender="server", receiver=("a", "b", "c"), kind="weights")
    (record,) = wire._records
    assert record.broadcast and record.tensor.shape == (4,)  # one copy, not three
    seen = wire.observed(kind="weights")
    assert [t.receiver for t in seen] == ["a", "b", "c"] and all(torch.equal(t.tensor, w) for t in seen)
    assert wire.total_bytes == 3 * 16 and len(wire) == 3
