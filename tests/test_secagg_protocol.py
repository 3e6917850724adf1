"""Secure aggregation's four rounds over the Wire (defenses.secagg.protocol): dropout recovery, what the
server sees, the adversarial schedule, SecAgg+ neighbourhoods."""
import math
import os
import random

import networkx as nx
import pytest
import torch
from scipy.stats import chisquare

from defenses.secagg import FixedPoint, expand
from defenses.secagg.aead import open_sealed, seal
from defenses.secagg.protocol import (KINDS, STAGES, default_neighbours, neighbourhoods, resolve_threshold,
                                      secure_sum)
from defenses.secagg.protocol_client import DROPPED, SURVIVED, SecAggClient
from defenses.secagg.wireformat import UNMASK, pack_id, pack_ring, rows, to_bytes, unpack_ring
from toolkit.wire import Wire

BITS = 20


def _names(n):
    return [f"client:{i}" for i in range(n)]


def _plain(x, names, included, bits=BITS):
    idx = [names.index(n) for n in included]
    return x[idx].sum(0) % (1 << bits)


class Recording(SecAggClient):
    """Keeps every client object of a run (to read its secrets in a test, or to replay a request)."""
    made: list = []

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        Recording.made.append(self)


# ---- correctness under dropouts -----------------------------------------------------------------

def test_sum_equals_the_plaintext_sum_over_200_seeded_trials_with_dropouts_at_every_stage():
    stages_hit = {s: 0 for s in STAGES}
    for trial in range(200):
        rng = random.Random(trial)
        n = rng.randint(5, 10)
        t = rng.randint(2, n - 2)
        names = _names(n)
        fp = FixedPoint(n_clients=n, bound=1.0, frac=12)
        gen = torch.Generator().manual_seed(trial)
        floats = torch.rand(n, 8, generator=gen, dtype=torch.float64) * 2 - 1
        x = fp.encode(floats)
        pool, budget, drops = rng.sample(names, n), n - t, {}
        for s in rng.sample(STAGES, 4):  # up to n - t dropouts in all, over the stages in random order
            m = rng.randint(0, budget)
            drops[s], pool, budget = pool[:m], pool[m:], budget - m
            stages_hit[s] += bool(m)
        out = secure_sum(Wire(), x, names, threshold=t, bits=fp.bits, round=trial, dropouts=drops)
        assert out.threshold == t
        survivors = [nm for nm in names if nm not in drops["advertise"] + drops["share"] + drops["masked"]]
        assert out.included == tuple(survivors)  # exactly the masked-input round's survivors
        assert torch.equal(out.total, _plain(x, names, survivors, fp.bits))  # the ring sum is exact
        idx = [names.index(nm) for nm in survivors]
        # decoded: within the encoding's rounding, half a step per client, of the float sum
        assert (fp.decode(out.total) - floats[idx].sum(0)).abs().max() <= len(idx) * fp.step / 2 + 1e-12
        assert out.answered["unmask"] == n - sum(len(v) for v in drops.values())
    assert all(v > 50 for v in stages_hit.values())  # every stage saw dropouts in many trials


@pytest.mark.parametrize("stage,round_name", [("advertise", "round 0"), ("share", "round 1"),
                                              ("masked", "round 2"), ("unmask", "round 3")])
def test_fewer_than_t_survivors_at_any_stage_fail_loudly_and_release_nothing(stage, round_name):
    names = _names(6)
    x = torch.randint(0, 1 << BITS, (6, 8))
    wire = Wire()
    with pytest.raises(ValueError, match=rf"{round_name} .*: 3 of 6 clients answered, fewer than the threshold "
                                         r"t = 4: no sum is released"):
        secure_sum(wire, x, names, threshold=4, bits=BITS, round=1, dropouts={stage: names[:3]})
    sent = {t.kind for t in wire.observed()}
    assert sent <= {k for s in STAGES[:STAGES.index(stage) + 1] for k in KINDS[s]}  # nothing after the failure


def test_threshold_resolution():
    assert resolve_threshold(0.5, 10) == 5 and resolve_threshold(0.5, 3) == 2 and resolve_threshold(0.1, 5) == 2
    assert resolve_threshold(1.0, 7) == 7 and resolve_threshold(3, 5) == 3
    with pytest.raises(ValueError, match="t = 1 < 2"):
        resolve_threshold(1, 5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        resolve_threshold(1.5, 5)


# ---- masks --------------------------------------------------------------------------------------

def test_pairwise_masks_cancel_exactly_and_mask_seeds_have_256_bits():
    Recording.made = []
    names, x = _names(6), torch.randint(0, 1 << BITS, (6, 50))
    wire = Wire()
    out = secure_sum(wire, x, names, threshold=3, bits=BITS, round=7, client=Recording)
    clients = Recording.made
    assert all(len(c._b) * 8 == 256 for c in clients)  # self-mask seeds: 256 bits from os.urandom
    assert len({c._b for c in clients}) == 6
    ys = {t.sender: unpack_ring(t.tensor, 50, BITS) for t in wire.observed(by="server", kind="masked-input")}
    # y_u - x_u - PRG(b_u) is the client's pairwise mask sum; they cancel exactly over the clients
    pair = [(ys[c.name] - x[c.index] - expand(c._b, 50, BITS, 7, "self")) % (1 << BITS) for c in clients]
    assert all(bool(p.any()) for p in pair)
    assert torch.equal(sum(pair) % (1 << BITS), torch.zeros(50, dtype=torch.int64))
    assert torch.equal(out.total, x.sum(0) % (1 << BITS))
    # the pairwise seeds are 256-bit HKDF outputs; masks refuse anything below 128 bits
    a, b = clients[0], clients[1]
    seed = a._s.agree(0, 1, b._s.public_bytes)
    assert len(seed) == 32 and seed == b._s.agree(1, 0, a._s.public_bytes)
    with pytest.raises(ValueError, match="too short"):
        expand(os.urandom(15), 8, BITS)


# ---- what the server sees -------------------------------------------------------------------------

def test_the_server_transcript_holds_only_keys_ciphertexts_masked_vectors_commitments_and_owed_shares():
    n, d = 8, 2000
    fp = FixedPoint(n_clients=n, bound=1.0, frac=16)
    gen = torch.Generator().manual_seed(0)
    floats = (torch.rand(n, d, generator=gen) * 0.2 - 0.1).to(torch.float32)  # small updates: a skewed encoding
    x = fp.encode(floats)
    names, wire = _names(n), Wire()
    secure_sum(wire, x, names, threshold=4, bits=fp.bits, round=3, dropouts={"masked": ["client:5"]})
    seen = wire.observed(by="server")
    allowed = {"secagg-keys", "secagg-shares", "secagg-seed-hash", "masked-input", "secagg-commit",
               "unmask-shares", "secagg-opening"}
    assert {t.kind for t in seen} == allowed
    assert all(t.tensor.dtype == torch.uint8 for t in seen)
    blob = b"".join(to_bytes(t.tensor.flatten()) for t in seen)
    for u in range(n):
        assert to_bytes(pack_ring(x[u], fp.bits)) not in blob  # no encoding
        assert floats[u, :8].numpy().tobytes() not in blob  # no plaintext update
        assert x[u, :8].numpy().tobytes() not in blob
    masked = [unpack_ring(t.tensor, d, fp.bits) for t in seen if t.kind == "masked-input"]
    assert len(masked) == n - 1
    top = lambda v: torch.bincount(v >> (fp.bits - 4), minlength=16).numpy()  # noqa: E731  (16 bins by top bits)
    for y in masked:
        assert chisquare(top(y)).pvalue > 1e-4  # uniform over the ring
    assert chisquare(top(x[0])).pvalue < 1e-12  # the encoding itself is far from uniform
    # the shares the server is owed: for each owner one kind only, b for survivors, s_SK for client:5
    kinds = {}
    for t in seen:
        if t.kind == "unmask-shares":
            raw = to_bytes(t.tensor)
            kinds.setdefault(int.from_bytes(raw[:2], "big"), set()).add(raw[2])
    assert kinds[5] == {DROPPED} and all(kinds[u] == {SURVIVED} for u in range(n) if u != 5)


# ---- adversarial schedule -------------------------------------------------------------------------

def test_duplicate_client_ids_are_named():
    with pytest.raises(ValueError, match=r"duplicate client ids \['client:1'\]"):
        secure_sum(Wire(), torch.zeros(3, 4, dtype=torch.int64), ["client:0", "client:1", "client:1"],
                   threshold=2, bits=BITS, round=1)


class TwiceMasked(SecAggClient):
    def masked_input(self, forwarded):
        y, c = super().masked_input(forwarded)
        if self.name == "client:2":
            return torch.stack([y, y]), torch.stack([c, c])
        return y, c


class TwiceKeys(SecAggClient):
    def advertise(self):
        keys = super().advertise()
        return torch.cat([keys, keys]) if self.name == "client:3" else keys


@pytest.mark.parametrize("client,match", [
    (TwiceMasked, r"round 2 .*client:2 submitted 2 masked inputs.*each client submits once"),
    (TwiceKeys, r"round 0 .*client:3 submitted 2 public keys")])
def test_a_client_submitting_twice_is_named(client, match):
    wire = Wire()
    with pytest.raises(ValueError, match=match):
        secure_sum(wire, torch.zeros(5, 4, dtype=torch.int64), _names(5), threshold=3, bits=BITS, round=1,
                   client=client)
    assert not wire.observed(kind="unmask-shares")


def _flip_once(target, row, byte, delta=1):
    """A wire transform changing one byte of the first send of kind ``target`` (a tamperer in transit)."""
    state = {"done": False}

    def transform(t, *, kind):
        if kind != target or state["done"]:
            return t
        state["done"] = True
        t = t.clone()
        t[row, byte] = (int(t[row, byte]) + delta) % 256
        return t
    return transform


def test_a_tampered_share_ciphertext_is_named():
    wire = Wire([_flip_once("secagg-shares", row=0, byte=60)])  # client:0's ciphertext to client:1
    with pytest.raises(ValueError, match=r"client:1: the shares from client:0 do not verify.*does not authenticate"):
        secure_sum(wire, torch.zeros(5, 4, dtype=torch.int64), _names(5), threshold=3, bits=BITS, round=1)
    assert not wire.observed(kind="masked-input")


def test_a_share_that_does_not_verify_names_its_holder():
    n = 6  # no dropouts: each holder returns one row per owner, holders in order, owners in order
    holder, owner = 4, 2
    wire = Wire([_flip_once("unmask-shares", row=holder * n + owner, byte=UNMASK - 1)])
    with pytest.raises(ValueError, match=rf"round 3 .*the share from client:{holder} of client:{owner}'s "
                                         r"self-mask seed b does not verify \(tampered\): no sum"):
        secure_sum(wire, torch.zeros(n, 4, dtype=torch.int64), _names(n), threshold=3, bits=BITS, round=1)


def test_a_share_with_the_wrong_index_is_named():
    n = 5
    wire = Wire([_flip_once("unmask-shares", row=1 * n + 3, byte=4)])  # client:1's share of client:3: index byte
    with pytest.raises(ValueError, match=r"client:1's share of client:3 does not verify: index"):
        secure_sum(wire, torch.zeros(n, 4, dtype=torch.int64), _names(n), threshold=3, bits=BITS, round=1)


def test_a_tampered_masked_input_fails_its_commitment_and_is_named():
    wire = Wire([_flip_once("masked-input", row=2, byte=0)])
    with pytest.raises(ValueError, match=r"1 client\(s\) failed to open.*'client:2' \(opening does not match"):
        secure_sum(wire, torch.zeros(5, 4, dtype=torch.int64), _names(5), threshold=3, bits=BITS, round=1)
    # without commitments the tampering goes through unnoticed: the sum is off
    wire = Wire([_flip_once("masked-input", row=2, byte=0)])
    out = secure_sum(wire, torch.zeros(5, 4, dtype=torch.int64), _names(5), threshold=3, bits=BITS, round=1,
                     commitments=False)
    assert out.total.any()


def test_a_threshold_larger_than_the_clients_is_refused():
    with pytest.raises(ValueError, match=r"threshold t = 7 is larger than the 5 clients"):
        secure_sum(Wire(), torch.zeros(5, 4, dtype=torch.int64), _names(5), threshold=7, bits=BITS, round=1)


def test_a_client_asked_for_both_shares_of_a_peer_refuses():
    Recording.made = []
    secure_sum(Wire(), torch.zeros(5, 4, dtype=torch.int64), _names(5), threshold=3, bits=BITS, round=1,
               dropouts={"masked": ["client:4"]}, client=Recording)
    c0 = Recording.made[0]
    # a second request now claims client:1 dropped (after client:0 revealed its b share): refused
    request = rows([pack_id(i) + bytes([DROPPED if i in (1, 4) else SURVIVED]) for i in range(5)], 3)
    with pytest.raises(ValueError, match=r"client:0 refuses: asked for both the share of b and the share of "
                                         r"s_SK of \['client:1'\]"):
        c0.unmask(request)
    request = rows([pack_id(i) + bytes([DROPPED if i in (0, 4) else SURVIVED]) for i in range(5)], 3)
    with pytest.raises(ValueError, match="client:0 refuses: the server did not list it as a survivor"):
        c0.unmask(request)


def test_ciphertexts_are_bound_to_sender_recipient_and_round():
    key = os.urandom(32)
    blob = seal(key, b"shares", sender=0, recipient=1, round=5)
    assert open_sealed(key, blob, sender=0, recipient=1, round=5) == b"shares"
    for kw in ({"sender": 1, "recipient": 0, "round": 5}, {"sender": 0, "recipient": 2, "round": 5},
               {"sender": 0, "recipient": 1, "round": 6}):
        with pytest.raises(ValueError, match="does not authenticate"):
            open_sealed(key, blob, **kw)
    assert seal(key, b"shares", sender=0, recipient=1, round=5) != blob  # a fresh nonce every time


def test_ring_packing_round_trips_at_every_width():
    for bits in (1, 7, 8, 21, 33, 62):
        v = torch.randint(0, 1 << min(bits, 62), (37,))
        packed = pack_ring(v, bits)
        assert packed.numel() == math.ceil(37 * bits / 8)
        assert torch.equal(unpack_ring(packed, 37, bits), v)
    with pytest.raises(ValueError, match="outside the ring"):
        pack_ring(torch.tensor([4]), 2)


# ---- SecAgg+ -------------------------------------------------------------------------------------

def test_secagg_plus_sums_correctly_under_dropouts_with_fewer_bytes_per_client():
    n = 30
    names, x = _names(n), torch.randint(0, 1 << BITS, (n, 8))
    k = default_neighbours(n)
    assert k == 10
    drops = {"share": ["client:3", "client:17"], "masked": ["client:8", "client:21"], "unmask": ["client:11"]}
    plus = secure_sum(Wire(), x, names, threshold=0.5, bits=BITS, round=2, neighbours="log",
                      generator=torch.Generator().manual_seed(0), dropouts=drops)
    full = secure_sum(Wire(), x, names, threshold=0.5, bits=BITS, round=2, dropouts=drops)
    for out in (plus, full):
        assert torch.equal(out.total, _plain(x, names, out.included))
        assert len(out.included) == n - 4
    assert plus.neighbours == k and plus.threshold == 6 and full.threshold == 15 and full.neighbours == n - 1
    per_client = lambda o: (sum(o.bytes_up.values()) + sum(o.bytes_down.values())) / n  # noqa: E731
    assert per_client(plus) < 0.6 * per_client(full)
    for s in ("advertise", "share", "unmask"):
        assert plus.bytes_up[s] + plus.bytes_down[s] < full.bytes_up[s] + full.bytes_down[s]
    assert plus.bytes_up["masked"] == full.bytes_up["masked"]  # the masked vectors cost the same


def test_secagg_plus_fails_loudly_when_a_neighbourhood_loses_too_many():
    n = 12
    nb = neighbourhoods(n, 4, torch.Generator().manual_seed(1))
    victim = 0
    lost = sorted(nb[victim] - {victim})[:3]  # 5-client neighbourhood, t = 3: only 2 left
    with pytest.raises(ValueError, match=r"only 2 clients of client:0's neighbourhood"):
        secure_sum(Wire(), torch.zeros(n, 4, dtype=torch.int64), _names(n), threshold=3, bits=BITS, round=1,
                   neighbours=4, generator=torch.Generator().manual_seed(1),
                   dropouts={"share": [f"client:{i}" for i in lost]})


def test_neighbourhood_graphs_are_regular_seeded_and_stay_connected_under_light_dropout():
    n = 100
    k = default_neighbours(n)
    assert k == 2 * math.ceil(math.log2(n)) == 14
    a = neighbourhoods(n, k, torch.Generator().manual_seed(3))
    assert a == neighbourhoods(n, k, torch.Generator().manual_seed(3))
    assert a != neighbourhoods(n, k, torch.Generator().manual_seed(4))
    assert all(len(s) == k + 1 and i in s for i, s in enumerate(a))
    assert all((j in a[i]) == (i in a[j]) for i in range(n) for j in range(n))  # symmetric
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):  # the survivors' masking graph stays connected at 10% dropout
        nb = neighbourhoods(n, k, gen)
        alive = (torch.rand(n, generator=gen) >= 0.1).nonzero().flatten().tolist()
        g = nx.Graph([(i, j) for i in alive for j in nb[i] if j in alive and j != i])
        g.add_nodes_from(alive)
        assert nx.is_connected(g)
    assert neighbourhoods(8, 7, None) is None  # k = n - 1: every pair (SecAgg)
