"""The 32-bit seed brute force: NumPy's generators vectorized exactly, a planted seed recovered with
the exact update, no false positive on a ChaCha20 mask, clear errors on bad input."""
import os

import numpy as np
import pytest
import torch

from attacks.numpy_prg import PRGS, ring_values
from attacks.seed_recovery import SeedRecovery, flower_seed, weak_mask
from defenses.secagg import FixedPoint, expand
from toolkit.wire import Wire

FP = FixedPoint(n_clients=10, bound=1.0, frac=16)  # the ring a 10-client round would use: 22 bits
D = 200


def _update(seed=0, d=D):
    g = torch.Generator().manual_seed(seed)
    return torch.empty(d, dtype=torch.float64).uniform_(-1, 1, generator=g)


def _transcript(*vectors, kind="masked-input"):
    wire = Wire()
    for i, y in enumerate(vectors):
        wire.send(y, sender=f"client:{i}", receiver="server", kind=kind)
    return wire.observed(by="server")


def _attack(**kw):
    return SeedRecovery(**{"bits": FP.bits, "frac": FP.frac, "bound": FP.bound, **kw})


@pytest.mark.parametrize("prg", PRGS)
@pytest.mark.parametrize("bits", [8, 16, 22, 32, 40, 62])
def test_the_vectorized_generators_equal_numpys(prg, bits):
    seeds = np.random.default_rng(bits).integers(0, 2**32, 300, dtype=np.uint64).astype(np.uint32)
    seeds[:3] = [0, 1, 2**32 - 1]
    values, rejected = ring_values(prg, seeds, 9, bits)
    for j, s in enumerate(seeds.tolist()):
        exact = weak_mask(s, 9, bits, prg)
        assert ((exact >= 0) & (exact < 2**bits)).all()
        if not rejected[j]:
            assert values[:, j].tolist() == exact.tolist(), (prg, bits, s)
    if prg == "flower" and bits == 8:  # a draw of 255 is rejected with probability 1/256 per draw
        assert 0 < rejected.sum() < 60
    else:
        assert not rejected.any()


@pytest.mark.parametrize("prg", PRGS)
def test_a_planted_seed_is_recovered_with_the_exact_update(prg):
    x = _update()
    planted = int(torch.randint(0, 2**16, (1,), generator=torch.Generator().manual_seed(1)))
    y = torch.remainder(FP.encode(x) + torch.from_numpy(weak_mask(planted, D, FP.bits, prg)), 2**FP.bits)
    result = _attack(prg=prg).run(_transcript(y))
    extras = result.extras
    assert extras["seeds"] == [planted] and extras["searched"] == [planted + 1]
    assert torch.equal(result.reconstruction[0], FP.decode(FP.encode(x)))  # exactly the encoded update
    assert (result.reconstruction[0] - x).abs().max() <= FP.step / 2
    assert extras["seeds_per_second"] > 0 and extras["hours_for_2_32"] * 3600 * extras["seeds_per_second"] == \
        pytest.approx(2**32)
    assert extras["years_for_2_128"] > 1e12 and extras["false_positives"] < 1e-100


def test_a_flower_seed_derived_from_a_256_bit_secret_is_recovered_in_its_seed_space():
    secret = bytes(range(28)) + bytes([1, 2, 0, 0])  # folds to a seed a search from 0x..0000 reaches
    seed = flower_seed(secret)
    assert seed == int.from_bytes(secret[28:], "little") ^ flower_seed(secret[:28])
    x = _update(2)
    y = torch.remainder(FP.encode(x) + torch.from_numpy(weak_mask(seed, D, FP.bits)), 2**FP.bits)
    start = seed - seed % 2**16
    result = _attack(start=start, seeds=2**16).run(_transcript(y))
    assert result.extras["seeds"] == [seed]
    assert torch.equal(result.reconstruction[0], FP.decode(FP.encode(x)))


def test_the_known_mask_terms_are_removed_first():
    x, b = _update(3), os.urandom(32)
    self_mask = expand(b, D, FP.bits, purpose="self")  # the server learns b at unmasking
    y = torch.remainder(FP.encode(x) + self_mask + torch.from_numpy(weak_mask(777, D, FP.bits)), 2**FP.bits)
    observed = _transcript(y)
    assert _attack(seeds=2**10).run(observed).extras["seeds"] == [None]  # the unknown self mask hides it
    result = _attack(seeds=2**10).run(observed, known={"client:0": self_mask})
    assert result.extras["seeds"] == [777]
    assert torch.equal(result.reconstruction[0], FP.decode(FP.encode(x)))


def test_a_seed_whose_draws_hit_a_rejection_is_still_found():
    bits, n = 8, 400  # flower's randint(0, 255) rejects a draw of 255: the vectorized values shift
    seeds = np.arange(2**12, dtype=np.uint32)
    _, rejected = ring_values("flower", seeds, 4, bits)
    planted = int(seeds[rejected][0])
    x = torch.randint(-1, 2, (n,), generator=torch.Generator().manual_seed(0))
    y = torch.remainder(x + torch.from_numpy(weak_mask(planted, n, bits)), 2**bits)
    result = SeedRecovery(bits=bits, frac=0, bound=1.0, seeds=2**12).run(_transcript(y))
    assert result.extras["seeds"] == [planted]
    assert torch.equal(result.reconstruction[0], x.double())


def test_a_chacha20_masked_vector_yields_no_seed():
    x = _update(4)
    y = torch.remainder(FP.encode(x) + expand(os.urandom(32), D, FP.bits), 2**FP.bits)
    for prg in PRGS:
        result = _attack(prg=prg).run(_transcript(y))
        assert result.extras["seeds"] == [None] and result.extras["searched"] == [2**16]
        assert torch.isnan(result.reconstruction).all()


def test_several_clients_and_one_sender():
    xs = [_update(5), _update(6)]
    ys = [torch.remainder(FP.encode(x) + torch.from_numpy(weak_mask(s, D, FP.bits)), 2**FP.bits)
          for x, s in zip(xs, (11, 4000))]
    observed = _transcript(*ys)
    result = _attack(seeds=2**12).run(observed)
    assert result.extras["senders"] == ["client:0", "client:1"] and result.extras["seeds"] == [11, 4000]
    assert torch.equal(result.reconstruction, torch.stack([FP.decode(FP.encode(x)) for x in xs]))
    one = _attack(seeds=2**12).run(observed, sender="client:1")
    assert one.extras["seeds"] == [4000] and one.reconstruction.shape == (1, D)


def test_max_steps_caps_the_chunks_searched():
    x = _update(7)
    y = torch.remainder(FP.encode(x) + torch.from_numpy(weak_mask(3000, D, FP.bits)), 2**FP.bits)
    result = _attack(seeds=2**12, chunk=1024).run(_transcript(y), max_steps=2)
    assert result.extras["seeds"] == [None] and result.extras["searched"] == [2048]
    assert _attack(seeds=2**12, chunk=1024).run(_transcript(y), max_steps=3).extras["seeds"] == [3000]


@pytest.mark.parametrize("kw,match", [
    ({"bits": 1}, "bits"), ({"bits": 63}, "bits"), ({"frac": -1}, "frac"), ({"bound": 0}, "bound"),
    ({"prg": "mt19937"}, "prg"), ({"seeds": 0}, "seeds"), ({"start": 2**32 - 10, "seeds": 11}, "2\\^32"),
    ({"chunk": 0}, "chunk"), ({"kind": ""}, "kind"), ({"bits": 16, "frac": 15}, "fills the 16-bit ring"),
])
def test_bad_settings_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        _attack(**kw)


def test_bad_input_is_a_clear_error():
    good = torch.remainder(FP.encode(_update()), 2**FP.bits)
    attack = _attack(seeds=2**8)
    with pytest.raises(ValueError, match="needs transfers of kind 'masked-input'; the transcript holds kinds \\['update'\\]"):
        attack.run(_transcript(good.double(), kind="update"))
    with pytest.raises(ValueError, match="client:0 -> server at step 0 is torch.float64 \\(200,\\); it reads 1-D int64 ring elements"):
        attack.run(_transcript(good.double()))
    with pytest.raises(ValueError, match="1-D int64"):
        attack.run(_transcript(good[None]))
    with pytest.raises(ValueError, match="outside the ring"):
        attack.run(_transcript(good + 2**FP.bits))
    with pytest.raises(ValueError, match="no 'masked-input' transfer from 'client:9'"):
        attack.run(_transcript(good), sender="client:9")
    with pytest.raises(ValueError, match="known mask terms for client:0"):
        attack.run(_transcript(good), known=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="too short a vector"):  # p = 1/32 per element: 3 elements cannot tell
        attack.run(_transcript(good[:3]))
    with pytest.raises(TypeError, match="generator"):
        attack.run(_transcript(good), generator=0)
    with pytest.raises(ValueError, match="secret"):
        flower_seed(b"abc")
    with pytest.raises(ValueError, match="below 2\\^32"):
        weak_mask(2**32, 4, 16)
