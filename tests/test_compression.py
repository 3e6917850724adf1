"""Update compression: top-k with error feedback and QSGD, byte counts, packets, bad input."""
import math

import pytest
import torch

from toolkit.federated.compression import (COMPRESSORS, QSGD, Compressor, QuantizedPacket, SparsePacket,
                                           TopK, make_compressor)
from toolkit.wire import Wire


def randn(*shape, seed=0):
    # offset: data drawn from the same seed as QSGD's rounding would be correlated with it
    return torch.randn(*shape, generator=torch.Generator().manual_seed(10_000 + seed))


def distinct_magnitudes(K, P, seed=0):
    """(K, P) with all |values| distinct in every row (so the top k are unambiguous), random signs."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.stack([torch.randperm(P, generator=g) for _ in range(K)]).float() + 1.0
    signs = torch.randint(0, 2, (K, P), generator=g).float() * 2 - 1
    return mags * signs / P


def packets_equal(a, b):
    ta, tb = a.tensors(), b.tensors()
    meta_a = {k: v for k, v in vars(a).items() if k not in ta}
    meta_b = {k: v for k, v in vars(b).items() if k not in tb}
    return (type(a) is type(b) and ta.keys() == tb.keys() and meta_a == meta_b
            and all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta))


# -- TopK --------------------------------------------------------------------------------------
def test_topk_keeps_exactly_the_k_largest_magnitudes_and_decodes_them_bit_for_bit():
    K, P, ratio = 6, 1000, 0.05
    u = distinct_magnitudes(K, P)
    packet = TopK(ratio, error_feedback=False).compress(u, torch.arange(K))
    k = round(ratio * P)
    assert packet.values.shape == packet.offsets.shape == (K, k)
    assert packet.values.dtype == torch.float32 and packet.offsets.dtype == torch.int16
    assert packet.counts.dtype == torch.int32 and packet.counts.shape == (K, 1)
    dense = packet.decode()
    assert dense.shape == (K, P) and dense.dtype == torch.float32
    expected_pos = u.abs().argsort(dim=1, descending=True)[:, :k].sort(dim=1).values  # (K, k)
    assert torch.equal(packet.positions(), expected_pos)
    kept = torch.zeros(K, P, dtype=torch.bool).scatter_(1, expected_pos, True)
    assert torch.equal(dense[kept], u[kept])           # the very same float32 bits
    assert bool((dense[~kept] == 0).all())
    assert torch.equal(dense, torch.where(kept, u, torch.zeros(())))
    # offsets are sorted positions within the (single) block, shifted to fit int16
    assert torch.equal(packet.offsets.long() + 32768, expected_pos)
    assert bool((packet.offsets[:, 1:] > packet.offsets[:, :-1]).all())


@pytest.mark.parametrize("P", [1, 7, 9610, 65535, 65536, 65537, 150_000])
def test_topk_round_trips_across_block_boundaries(P):
    K = 3
    u = randn(K, P, seed=P) * 0.01
    edges = [i for i in (0, 1, 65535, 65536, 65537, 131071, 131072, P - 1) if i < P]
    u[:, edges] = torch.arange(1, len(edges) + 1, dtype=torch.float32) * 10  # force these into the top k
    u[1, edges] *= -1
    comp = TopK(0.02, error_feedback=False)
    packet = comp.compress(u, torch.tensor([5, 0, 2]))
    k, n_blocks = max(1, round(0.02 * P)), math.ceil(P / 65536)
    assert packet.counts.shape == (K, n_blocks) and packet.values.shape == (K, k)
    assert packet.counts.sum(dim=1).tolist() == [k] * K
    assert packet.nbytes == K * (n_blocks * 4 + k * 2 + k * 4)
    dense = comp.decompress(packet)
    pos = packet.positions()
    assert set(edges[-k:]) <= set(pos[0].tolist())  # the forced entries (largest last) are kept
    expected = torch.zeros(K, P).scatter_(1, pos, u.gather(1, pos))
    assert torch.equal(dense, expected)
    top = u.abs().topk(k, dim=1).values  # (K, k) magnitudes of the true top k
    assert torch.equal(dense.abs().sort(dim=1, descending=True).values[:, :k], top)
    if P == 150_000:  # several blocks, each counted
        blocks = pos // 65536
        counted = torch.stack([(blocks == b).sum(dim=1) for b in range(n_blocks)], dim=1)
        assert torch.equal(packet.counts.long(), counted) and bool((packet.counts > 0).all())


def test_topk_with_ratio_one_percent_is_over_60x_smaller_per_row():
    K, P = 4, 9610
    packet = TopK(0.01).compress(randn(K, P), torch.arange(K))
    k = round(0.01 * P)
    assert k == 96
    assert packet.nbytes == K * (4 + k * 2 + k * 4)
    dense_row = P * 4
    assert dense_row / (packet.nbytes / K) >= 60


def test_k_is_at_least_one_and_at_most_p():
    assert TopK(1e-9).k_for(10) == 1
    assert TopK(1.0).k_for(10) == 10
    assert TopK(0.25).k_for(10) == round(2.5)
    u = randn(2, 10)
    assert torch.equal(TopK(1.0, error_feedback=False).compress(u, torch.arange(2)).decode(), u)


def test_error_feedback_telescopes_over_rounds():
    K, P, rounds = 4, 300, 7
    clients = torch.tensor([3, 0, 11, 7])
    comp = TopK(0.05)
    sent, raw = torch.zeros(K, P), torch.zeros(K, P)
    for t in range(rounds):
        u = randn(K, P, seed=t)
        raw += u
        sent += comp.decompress(comp.compress(u, clients))
    residual = comp.residual
    assert residual.shape == (12, P) and residual.dtype == torch.float32
    assert torch.allclose(sent + residual[clients], raw, atol=1e-5)
    assert bool((residual[[1, 2, 4, 5, 6, 8, 9, 10]] == 0).all())  # never seen: no memory
    assert residual[clients].abs().sum() > 0  # something is carried over
    # error feedback sends what plain top-k drops: over rounds the sums agree far better
    plain = TopK(0.05, error_feedback=False)
    plain_sent = sum(plain.decompress(plain.compress(randn(K, P, seed=t), clients)) for t in range(rounds))
    assert (sent - raw).norm() < (plain_sent - raw).norm()


def test_qsgd_error_feedback_telescopes_too():
    K, P = 3, 200
    clients = torch.tensor([2, 1, 0])
    comp = QSGD(levels=2, error_feedback=True)
    g = torch.Generator().manual_seed(1)
    sent, raw = torch.zeros(K, P), torch.zeros(K, P)
    for t in range(5):
        u = randn(K, P, seed=t)
        raw += u
        sent += comp.compress(u, clients, generator=g).decode()
    assert torch.allclose(sent + comp.residual[clients], raw, atol=1e-5)


def test_without_error_feedback_nothing_is_remembered():
    comp = TopK(0.1, error_feedback=False)
    u = randn(2, 50)
    first = comp.compress(u, torch.tensor([0, 1])).decode()
    second = comp.compress(u, torch.tensor([0, 1])).decode()
    assert comp.residual is None and comp.state_dict() == {"residual": None}
    assert torch.equal(first, second)
    q = QSGD(4)
    q.compress(u, torch.tensor([0, 1]))
    assert q.residual is None


def test_each_client_keeps_its_own_memory():
    P = 80
    joint = TopK(0.1)
    alone = {c: TopK(0.1) for c in (0, 4)}
    for t in range(4):
        u = randn(2, P, seed=t)
        together = joint.compress(u, torch.tensor([4, 0])).decode()
        assert torch.equal(together[0], alone[4].compress(u[:1], torch.tensor([0])).decode()[0])
        assert torch.equal(together[1], alone[0].compress(u[1:], torch.tensor([0])).decode()[0])
    # a client that does not take part keeps its memory untouched
    before = joint.residual.clone()
    joint.compress(randn(1, P, seed=9), torch.tensor([4]))
    assert torch.equal(joint.residual[0], before[0]) and not torch.equal(joint.residual[4], before[4])


def test_memory_grows_for_new_clients_and_rejects_a_new_p():
    comp = TopK(0.5)
    comp.compress(randn(1, 6), torch.tensor([2]))
    kept = comp.residual[2].clone()
    assert comp.residual.shape == (3, 6)
    comp.compress(randn(2, 6, seed=1), torch.tensor([9, 0]))
    assert comp.residual.shape == (10, 6)
    assert torch.equal(comp.residual[2], kept)
    with pytest.raises(ValueError, match="7"):
        comp.compress(randn(1, 7), torch.tensor([0]))
    comp.reset()
    assert comp.residual is None
    comp.compress(randn(1, 7), torch.tensor([0]))
    assert comp.residual.shape == (1, 7)


def test_duplicate_clients_are_rejected_with_error_feedback():
    with pytest.raises(ValueError, match="client 3"):
        TopK(0.5).compress(randn(3, 4), torch.tensor([3, 1, 3]))
    TopK(0.5, error_feedback=False).compress(randn(3, 4), torch.tensor([3, 1, 3]))  # no memory: fine


@pytest.mark.parametrize("make", [lambda: TopK(0.05), lambda: QSGD(4, error_feedback=True)], ids=["topk", "qsgd"])
def test_state_dict_round_trip_gives_identical_next_outputs(make):
    K, P = 3, 120
    clients = torch.tensor([0, 5, 2])
    comp = make()
    for t in range(3):
        comp.compress(randn(K, P, seed=t), clients, generator=torch.Generator().manual_seed(t))
    state = comp.state_dict()
    nxt = randn(K, P, seed=99)
    a = comp.compress(nxt, clients, generator=torch.Generator().manual_seed(7))
    assert not torch.equal(state["residual"], comp.residual)  # the saved state is a copy
    resumed = make()
    resumed.load_state_dict(state)
    b = resumed.compress(nxt, clients, generator=torch.Generator().manual_seed(7))
    assert packets_equal(a, b)
    assert torch.equal(comp.residual, resumed.residual)
    with pytest.raises(ValueError, match="residual"):
        resumed.load_state_dict({"memory": None})


def test_loading_a_residual_into_a_compressor_without_memory_fails():
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        TopK(0.5, error_feedback=False).load_state_dict({"residual": torch.zeros(2, 3)})


# -- single rows and the wire -----------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: TopK(0.001), lambda: QSGD(1), lambda: QSGD(5), lambda: QSGD(100)],
                         ids=["topk", "qsgd1", "qsgd5", "qsgd100"])
def test_a_single_row_decodes_like_its_row_of_the_stack(make):
    K, P = 4, 140_001
    packet = make().compress(randn(K, P), torch.tensor([8, 1, 0, 3]), generator=torch.Generator().manual_seed(0))
    dense = packet.decode()
    for i in range(K):
        row = packet[i]
        assert type(row) is type(packet)
        assert torch.equal(row.decode(), dense[i])
    assert torch.equal(packet[1:3].decode(), dense[1:3])
    assert sum(packet[i].nbytes for i in range(K)) == packet.nbytes


def test_packets_cross_the_wire_counted_byte_for_byte_and_split_per_client():
    K, P = 3, 1000
    names = tuple(f"client:{i}" for i in range(K))
    for comp in (TopK(0.01), QSGD(8)):
        wire = Wire()
        packet = comp.compress(randn(K, P), torch.arange(K), generator=torch.Generator().manual_seed(0))
        got = wire.send(packet, sender=names, receiver="server", kind="update")
        assert wire.total_bytes == packet.nbytes
        dense = comp.decompress(got)
        seen = wire.observed(by="server")
        assert [tr.sender for tr in seen] == list(names)
        for i, tr in enumerate(seen):
            assert torch.equal(tr.tensor.decode(), dense[i])


def test_zero_rows_are_safe():
    u = randn(3, 100)
    u[1] = 0
    for comp in (QSGD(4), QSGD(1, error_feedback=True), TopK(0.1)):
        packet = comp.compress(u, torch.tensor([0, 1, 2]), generator=torch.Generator().manual_seed(0))
        dense = packet.decode()
        assert bool(torch.isfinite(dense).all())
        assert bool((dense[1] == 0).all())
    q = QSGD(4).compress(u, torch.arange(3), generator=torch.Generator().manual_seed(0))
    assert float(q.norms[1]) == 0.0 and bool((q.unpack()[1] == 4).all())


# -- bad input, names, repr --------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0, 0.0, -0.5, 1.5, 2, float("nan"), True, "0.1"])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio") as err:
        TopK(ratio)
    assert repr(ratio) in str(err.value)


@pytest.mark.parametrize("levels", [0, 128, -1, 2.0, True])
def test_bad_levels(levels):
    with pytest.raises(ValueError, match="levels") as err:
        QSGD(levels)
    assert repr(levels) in str(err.value)


@pytest.mark.parametrize("comp", [TopK(0.1), QSGD(4)], ids=repr)
def test_bad_updates_and_clients(comp):
    with pytest.raises(ValueError, match=r"\(10,\)"):
        comp.compress(randn(10), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        comp.compress(randn(4, 10), torch.arange(3))
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        comp.compress(randn(4, 10), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="-1"):
        comp.compress(randn(2, 10), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="float32"):
        comp.compress(randn(2, 10), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="int64"):
        comp.compress(torch.ones(2, 10, dtype=torch.long), torch.arange(2))
    for bad, text in ((float("nan"), "nan"), (float("inf"), "inf"), (-float("inf"), "-inf")):
        u = randn(3, 10)
        u[2, 7] = bad
        with pytest.raises(ValueError, match=f"{text} at row 2") as err:
            comp.compress(u, torch.arange(3))
        assert "coordinate 7" in str(err.value)
    big = torch.full((2, 10), 3e38)  # row sums overflow, entries are fine
    if isinstance(comp, QSGD):  # ... but the norm is not a float32
        with pytest.raises(ValueError, match="row 0 .*overflows float32"):
            comp.compress(big, torch.arange(2))
    else:
        dense = comp.compress(big, torch.arange(2)).decode()
        assert (dense != 0).sum(dim=1).tolist() == [1, 1] and dense.max().item() == big.max().item()
    with pytest.raises(TypeError):
        comp.compress([[1.0]], torch.arange(1))
    assert comp.residual is None or comp.residual.shape[0] >= 2  # bad calls left no half-done memory


def test_make_compressor_and_reprs():
    assert set(COMPRESSORS) == {"topk", "qsgd"}
    tk = make_compressor("topk", ratio=0.01)
    assert isinstance(tk, TopK) and isinstance(tk, Compressor)
    assert repr(tk) == "TopK(ratio=0.01, error_feedback=True)"
    assert repr(make_compressor("QSGD", levels=4, error_feedback=True)) == "QSGD(levels=4, error_feedback=True)"
    with pytest.raises(ValueError, match="'gzip'") as err:
        make_compressor("gzip")
    assert "qsgd" in str(err.value) and "topk" in str(err.value)
    with pytest.raises(TypeError):
        make_compressor("topk")  # ratio is required
    with pytest.raises(TypeError):
        Compressor()


def test_packet_reprs_are_short_and_metadata_is_checked():
    packet = TopK(0.01).compress(randn(1000, 5000), torch.arange(1000))
    assert repr(packet) == ("SparsePacket(counts (1000, 1) int32, offsets (1000, 50) int16, "
                            "values (1000, 50) float32; numel=5000, block=65536)")
    q = QSGD(3).compress(randn(2, 5), torch.arange(2))
    assert repr(q) == "QuantizedPacket(norms (2,) float32, codes (2, 3) uint8; numel=5, levels=3, bits=4)"
    with pytest.raises(ValueError, match="70000"):
        SparsePacket(packet.counts, packet.offsets, packet.values, numel=5000, block=70000)
    with pytest.raises(ValueError, match="bits=8"):
        QuantizedPacket(q.norms, q.codes, numel=5, levels=3, bits=8)
    assert isinstance(packet, SparsePacket) and isinstance(q, QuantizedPacket)


@pytest.mark.slow
def test_thousand_clients_by_fifty_thousand_coordinates_decode_correctly():
    """Vectorized over rows at scale, K=1000, P=50,000 (its speed is printed by
    benchmarks/federated_simulation.py): top-k keeps each row's k largest magnitudes exactly,
    QSGD stays within norm / levels of every row."""
    K, P = 1000, 50_000
    u = randn(K, P)
    clients = torch.arange(K)
    dense = TopK(0.01, error_feedback=False).decompress(TopK(0.01, error_feedback=False).compress(u, clients))
    k = round(0.01 * P)
    kept = dense != 0
    assert dense.shape == (K, P) and (kept.sum(1) == k).all()
    assert torch.equal(dense[kept], u[kept])
    assert (u.abs().masked_fill(kept, 0).amax(1) <= u.abs().masked_fill(~kept, float("inf")).amin(1)).all()
    packet = QSGD(16).compress(u, clients, generator=torch.Generator().manual_seed(1))
    dense = QSGD(16).decompress(packet)
    bound = u.double().norm(dim=1).float()[:, None] / 16
    assert dense.shape == (K, P) and bool(((dense - u).abs() <= bound * (1 + 1e-5)).all())
