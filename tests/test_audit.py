"""find_rows: raw samples are found in whatever layout they cross, in Packets too, and honest
activations are never flagged."""
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from toolkit import models
from toolkit.audit import carries, find_rows
from toolkit.federated.compression import QSGD, TopK
from toolkit.split import SplitConfig, SplitNN
from toolkit.wire import Packet, Wire


@dataclass(eq=False)
class ScaledRows(Packet):
    """A packet with no decode(): its tensor fields are audited as they are."""
    values: torch.Tensor
    scale: float = 1.0


@pytest.fixture(scope="module")
def raw(digits):
    return digits.x_train  # (1437, 1, 8, 8) float32, many zeros


@pytest.fixture(scope="module")
def batch(raw):
    return raw[10:14]  # (4, 1, 8, 8) four private samples


@pytest.fixture(scope="module")
def noise():
    return torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))


LAYOUTS = {
    "as is": lambda b, n: b,
    "flattened": lambda b, n: b.reshape(-1),
    "reshaped to rows of 7": lambda b, n: b.reshape(-1)[:252].reshape(-1, 7),
    "transposed (d, N)": lambda b, n: b.reshape(4, 64).T,
    "sample axis last": lambda b, n: b.permute(1, 2, 3, 0),
    "image transposed": lambda b, n: b.transpose(2, 3),
    "stacked with other rows": lambda b, n: torch.cat([n, b[1:2], n]),
    "concatenated with features": lambda b, n: torch.cat([n[:4].reshape(4, -1), b.reshape(4, -1)], 1),
    "stacked on the last axis": lambda b, n: torch.stack([n[:4], b], -1),
    "padded rows": lambda b, n: F.pad(b.reshape(4, 64), (3, 5)),
    "padded images": lambda b, n: F.pad(b, (1, 1, 2, 0)),
    "padded with zero samples": lambda b, n: torch.cat([torch.zeros(3, 1, 8, 8), b[2:3]]),
    "channels before samples": lambda b, n: torch.cat([b, b.flip(-1)], 1).transpose(0, 1),
    "float16": lambda b, n: b.half(),
    "bfloat16": lambda b, n: b.bfloat16(),
    "float64": lambda b, n: b.double(),
    "float16 and transposed": lambda b, n: b.reshape(4, 64).T.half(),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_raw_batch_is_found_in_any_layout(layout, raw, batch, noise):
    wire = Wire()
    wire.send(noise, sender="client", receiver="server", kind="activations")
    wire.send(LAYOUTS[layout](batch, noise), sender="client", receiver="server", kind="activations")
    hits = find_rows(wire.observed(), raw)
    assert [t.step for t in hits] == [0] and len(hits) == 1 and hits[0].tensor.shape == LAYOUTS[layout](batch, noise).shape


def test_integer_copies_of_whole_number_data_are_found_and_truncations_are_not():
    images = torch.randint(0, 256, (20, 3, 4, 4), generator=torch.Generator().manual_seed(1)).float()
    assert carries(images[3:5].to(torch.uint8).permute(0, 2, 3, 1), images)
    assert not carries((images[3:5] / 255).to(torch.int64), images)  # all zeros: not a copy


def test_a_near_copy_counts_within_atol_only(raw, batch):
    nudged = batch.reshape(4, 64).T + 1e-4  # transposed, each value moved by 1e-4: distance 8e-4
    assert not carries(nudged, raw)
    assert carries(nudged, raw, atol=1e-3) and not carries(nudged, raw, atol=1e-4)


def test_compressed_packets_are_audited_field_by_field_and_decoded(raw, batch):
    wire = Wire()
    rows = batch.reshape(4, 64)
    exact = TopK(1.0, error_feedback=False).compress(rows, torch.arange(4))  # keeps every value
    wire.send(exact, sender=tuple(f"client:{i}" for i in range(4)), receiver="server", kind="update")
    honest = QSGD(levels=4).compress(torch.randn(4, 64, generator=torch.Generator().manual_seed(2)),
                                     torch.arange(4), generator=torch.Generator().manual_seed(3))
    wire.send(honest, sender=tuple(f"client:{i}" for i in range(4)), receiver="server", kind="update")
    hits = find_rows(wire.observed(), raw)
    assert [(t.step, t.sender) for t in hits] == [(0, f"client:{i}") for i in range(4)]
    assert all(type(t.tensor).__name__ == "SparsePacket" for t in hits)
    assert carries(ScaledRows(values=rows[1:3].T.contiguous()), raw)  # no decode(): fields are searched
    assert not carries(ScaledRows(values=rows[1:3] * 0.5, scale=2.0), raw)


def test_a_broadcast_is_searched_once_and_flagged_for_every_receiver(raw, batch):
    wire = Wire()
    wire.broadcast(batch.reshape(-1), sender="server", receivers=["a", "b", "c"], kind="weights")
    assert [t.receiver for t in find_rows(wire.observed(), raw)] == ["a", "b", "c"]


def test_honest_split_training_is_never_flagged(digits, one_thread):
    torch.manual_seed(0)
    client, server = models.cut(models.convnet(), at="act1")
    sl = SplitNN.vanilla(client, server, digits, config=SplitConfig(lr=0.05, momentum=0.9, batch_size=32))
    sl.fit(epochs=1)
    sl.evaluate()
    transcript = sl.wire.observed()
    assert {t.kind for t in transcript} == {"activations", "labels", "gradients"}
    assert find_rows(transcript, digits.x_train) == [] and find_rows(transcript, digits.x_test) == []
    # the same activations transposed, cast and padded are still honest
    acts = [t.tensor for t in transcript if t.kind == "activations"][:5]
    assert not any(carries(F.pad(a.transpose(0, 3).half(), (1, 1)), digits.x_train) for a in acts)


def test_constant_rows_are_not_searched_and_bad_input_is_refused(raw):
    blank = torch.zeros(3, 64)
    assert not carries(torch.zeros(10, 64), blank)  # padding is not a leak of an all-zero sample
    with pytest.raises(ValueError, match=r"raw holds NaN at index \(0, 0\)"):
        find_rows([], torch.full((2, 3), float("nan")))
    with pytest.raises(TypeError, match="raw must be a torch.Tensor"):
        find_rows([], raw.numpy())
    with pytest.raises(ValueError, match="atol must be a non-negative number"):
        find_rows([], raw, atol=-1.0)
