"""The secure aggregation primitives (defenses.secagg): key agreement, masks, Shamir, encoding."""
import itertools
import math
import os
import random

import pytest
import torch

from defenses.secagg import (FixedPoint, KeyPair, MIN_SEED_BITS, Share, derive_seed, expand, masked_input,
                             pairwise_mask, public_key_from, reconstruct, ring_bits, ring_neg, ring_sum, share,
                             sum_pairwise_masks)
from defenses.secagg.shamir import PRIME, _evaluate, coefficients, interpolate


# ---- keys --------------------------------------------------------------------------------------

def test_agreement_is_symmetric_and_pair_specific():
    k = [KeyPair.generate() for _ in range(3)]
    s01 = k[0].agree(0, 1, k[1].public_bytes)
    assert s01 == k[1].agree(1, 0, k[0].public_tensor())
    assert len(s01) == 32
    assert s01 != k[0].agree(0, 2, k[2].public_bytes)
    assert s01 != k[0].agree(0, 1, k[1].public_bytes, purpose="self")
    # the ids are bound into the seed: the same keys under other ids give another seed
    assert s01 != k[0].agree(0, 5, k[1].public_bytes)


def test_public_key_transport_and_private_round_trip():
    a = KeyPair.generate()
    t = a.public_tensor()
    assert t.dtype == torch.uint8 and t.shape == (32,)
    assert bytes(t.tolist()) == a.public_bytes
    b = KeyPair.from_private_bytes(a.private_bytes)
    assert b.public_bytes == a.public_bytes
    peer = KeyPair.generate()
    assert b.agree(3, 4, peer.public_bytes) == a.agree(3, 4, peer.public_bytes)


def test_key_input_errors():
    a = KeyPair.generate()
    with pytest.raises(ValueError, match="32 raw bytes"):
        public_key_from(b"\x01" * 31)
    with pytest.raises(ValueError, match="uint8"):
        public_key_from(torch.zeros(32, dtype=torch.int64))
    with pytest.raises(ValueError, match="distinct client ids"):
        a.agree(2, 2, KeyPair.generate().public_bytes)
    with pytest.raises(ValueError, match="non-negative int"):
        derive_seed(b"\0" * 32, -1, 3)
    with pytest.raises(ValueError):  # low-order point: all-zero shared secret, refused by cryptography
        a.agree(0, 1, bytes(32))


# ---- masks -------------------------------------------------------------------------------------

@pytest.mark.parametrize("nbytes", [0, 4, 8, 15])
def test_short_seeds_are_refused(nbytes):
    with pytest.raises(ValueError, match=f"{8 * nbytes}-bit seed is too short.*brute force"):
        expand(os.urandom(nbytes), 10, 16)


def test_int_seed_is_refused():
    with pytest.raises(ValueError, match="brute-forceable"):
        expand(2**31 - 1, 10, 16)


def test_mask_expansion_uses_128_bit_plus_seeds_and_is_deterministic():
    assert MIN_SEED_BITS == 128
    s = os.urandom(16)  # exactly 128 bits is accepted
    a = expand(s, 1000, 20, round=3)
    assert a.dtype == torch.int64 and a.shape == (1000,)
    assert bool(((a >= 0) & (a < 2**20)).all())
    assert torch.equal(a, expand(s, 1000, 20, round=3))
    assert not torch.equal(a, expand(s, 1000, 20, round=4))  # nonce per round
    assert not torch.equal(a, expand(s, 1000, 20, round=3, purpose="self"))  # nonce per purpose
    assert torch.equal(expand(s, 10, 20, round=3), a[:10])  # a prefix of the same stream


def test_mask_is_the_chacha20_stream_across_chunks():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
    from defenses.secagg.masks import _CHUNK, _nonce
    seed, n = os.urandom(32), _CHUNK + 5
    enc = Cipher(algorithms.ChaCha20(seed, _nonce(2, "self")), mode=None).encryptor()
    words = [int.from_bytes(w, "little") for w in
             (lambda b: (b[i:i + 8] for i in range(0, len(b), 8)))(enc.update(bytes(8 * n)))]
    got = expand(seed, n, 40, round=2, purpose="self")
    assert got.tolist() == [w % 2**40 for w in words]
    assert expand(seed, 0, 40).shape == (0,)


def test_mask_elements_are_uniform():
    bits = 4
    m = expand(os.urandom(32), 16000, bits)
    counts = torch.bincount(m, minlength=16).double()
    chi2 = float(((counts - 1000) ** 2 / 1000).sum())
    assert chi2 < 45.0  # 15 d.o.f.: P(chi2 > 45) ~ 7e-5 for a uniform source
    low = expand(os.urandom(32), 20000, 62) & 1
    assert abs(float(low.double().mean()) - 0.5) < 0.02


@pytest.mark.parametrize("n_clients,bits", [(2, 8), (5, 20), (7, 62)])
def test_pairwise_masks_cancel_exactly(n_clients, bits):
    keys = [KeyPair.generate() for _ in range(n_clients)]
    ids = random.Random(n_clients).sample(range(1000), n_clients)  # arbitrary, unordered ids
    masks = []
    for a, u in enumerate(ids):
        peers = {v: keys[a].agree(u, v, keys[b].public_bytes) for b, v in enumerate(ids) if v != u}
        masks.append(sum_pairwise_masks(u, peers, 257, bits, round=1))
    assert any(bool(m.any()) for m in masks)  # the masks are not zero
    assert torch.equal(ring_sum(masks, bits), torch.zeros(257, dtype=torch.int64))


def test_pairwise_sign_convention():
    s = os.urandom(32)
    plus, minus = pairwise_mask(1, 2, s, 50, 16), pairwise_mask(2, 1, s, 50, 16)
    assert torch.equal(plus, expand(s, 50, 16))
    assert torch.equal(minus, ring_neg(expand(s, 50, 16), 16))
    with pytest.raises(ValueError, match="distinct"):
        pairwise_mask(3, 3, s, 5, 16)


def test_masked_inputs_sum_to_the_plain_sum_and_hide_each_input():
    n, d = 4, 300
    fp = FixedPoint(n, bound=2.0, frac=12)
    g = torch.Generator().manual_seed(0)
    xs = [(torch.rand(d, generator=g) * 4 - 2) for _ in range(n)]
    keys, self_seeds = [KeyPair.generate() for _ in range(n)], [os.urandom(32) for _ in range(n)]
    ys = [masked_input(fp.encode(xs[u]), u,
                       {v: keys[u].agree(u, v, keys[v].public_bytes) for v in range(n) if v != u},
                       self_seeds[u], fp.bits) for u in range(n)]
    unmask = [ring_neg(expand(b, d, fp.bits, purpose="self"), fp.bits) for b in self_seeds]
    total = fp.decode(ring_sum(ys + unmask, fp.bits))
    assert torch.allclose(total, torch.stack(xs).double().sum(0), atol=n * fp.step / 2, rtol=0)
    # a single masked input decodes to noise, not to the client's input
    err = (fp.decode(ys[0]) - xs[0].double()).abs()
    assert float(err.mean()) > 0.1 * 2 ** (fp.bits - 1) * fp.step


def test_masked_input_errors():
    with pytest.raises(ValueError, match="1-D int64"):
        masked_input(torch.zeros(3), 0, {}, os.urandom(32), 16)
    with pytest.raises(ValueError, match="outside the ring"):
        masked_input(torch.tensor([1 << 16]), 0, {}, os.urandom(32), 16)
    with pytest.raises(ValueError, match="ring bits"):
        expand(os.urandom(32), 3, 63)


# ---- Shamir ------------------------------------------------------------------------------------

@pytest.mark.parametrize("t,n", [(1, 1), (1, 4), (3, 5), (5, 5), (4, 7)])
def test_any_t_of_n_shares_reconstruct(t, n):
    secret = os.urandom(32)
    shares = share(secret, t, n)
    assert [s.index for s in shares] == list(range(1, n + 1))
    for subset in itertools.combinations(shares, t):
        assert reconstruct(list(reversed(subset))) == secret
    assert reconstruct(shares) == secret  # more than t: all checked, still the secret


def test_coefficients_recover_a_known_polynomial():
    poly = [random.Random(k).randrange(PRIME) for k in range(6)]
    points = [(x, _evaluate(poly, x)) for x in (3, 1, 9, 4, 7, 2)]
    assert coefficients(points) == poly
    assert interpolate(points, 0) == poly[0] and interpolate(points, 11) == _evaluate(poly, 11)


@pytest.mark.parametrize("length", [1, 15, 16, 31, 32, 33, 100])
def test_secret_lengths(length):
    secret = os.urandom(length)
    assert reconstruct(share(secret, 2, 3)[1:]) == secret


def test_t_minus_one_shares_reveal_nothing_testable():
    secret, t = os.urandom(32), 3
    hits = 0
    for _ in range(50):
        few = share(secret, t, 5)[:t - 1]
        with pytest.raises(ValueError, match="< threshold"):
            reconstruct(few)
        chunks = [int.from_bytes(secret[k:k + 15], "big") for k in range(0, 32, 15)]
        guess = [interpolate([(s.index, s.values[k]) for s in few]) for k in range(len(chunks))]
        hits += guess == chunks  # interpolating t - 1 shares as if they sufficed
    assert hits == 0
    # t - 1 shares are consistent with any secret: for a fake secret there is a degree t - 1
    # polynomial through (0, fake) and the t - 1 shares, whose value at x = t would be the t-th share
    few = share(secret, t, 5)[:t - 1]
    fake = os.urandom(32)
    fake_chunks = [int.from_bytes(fake[k:k + 15], "big") for k in range(0, 32, 15)]
    forged = Share(t, t, 32, tuple(interpolate([(0, fake_chunks[k])] + [(s.index, s.values[k]) for s in few], t)
                                   for k in range(len(few[0].values))))
    assert reconstruct(few + [forged]) == fake


def test_share_values_are_uniform_whatever_the_secret():
    # the top bit of one share of an all-zero secret and of an all-ones secret: both fair coins
    for secret in (bytes(32), b"\xff" * 32):
        bits = [share(secret, 2, 3)[0].values[0] >> 126 for _ in range(2000)]
        assert abs(sum(bits) / 2000 - 0.5) < 0.05


def test_shamir_errors():
    s = share(os.urandom(32), 3, 5)
    with pytest.raises(ValueError, match="t = 6 > n = 5"):
        share(b"x" * 32, 6, 5)
    with pytest.raises(ValueError, match="t = 0 < 1"):
        share(b"x" * 32, 0, 5)
    with pytest.raises(ValueError, match=r"2 share\(s\) < threshold t = 3"):
        reconstruct(s[:2])
    with pytest.raises(ValueError, match=r"duplicate share indices \[2\]"):
        reconstruct([s[0], s[1], s[1]])
    with pytest.raises(ValueError, match="no shares"):
        reconstruct([])
    with pytest.raises(ValueError, match="different secrets"):
        reconstruct(s[:2] + [share(os.urandom(16), 3, 5)[2]])
    with pytest.raises(ValueError, match="claim threshold 1, the protocol's is 3"):
        reconstruct(share(b"k" * 32, 1, 5)[:1], t=3)
    assert reconstruct(s[2:], t=3) == reconstruct(s[:3])
    with pytest.raises(ValueError, match="1..65535 bytes"):
        share(b"", 1, 2)


def test_a_tampered_share_is_named():
    secret = os.urandom(32)
    s = share(secret, 3, 5)
    bad = Share(5, 3, 32, ((s[4].values[0] + 1) % PRIME,) + s[4].values[1:])
    with pytest.raises(ValueError, match="share 5 does not lie on the polynomial"):
        reconstruct(s[:4] + [bad])


def test_share_bytes_round_trip_and_errors():
    s = share(os.urandom(32), 2, 3)[2]
    data = s.to_bytes()
    assert len(data) == 6 + 16 * 3
    assert Share.from_bytes(data) == s
    with pytest.raises(ValueError, match="expected 54"):
        Share.from_bytes(data[:-1])
    with pytest.raises(ValueError, match="not a field element"):
        Share.from_bytes(data[:6] + b"\xff" * 48)


# ---- encoding ----------------------------------------------------------------------------------

def test_ring_bits_formula_and_errors():
    for n, bound, frac in [(1, 1.0, 0), (3, 1.0, 16), (1000, 4.0, 20), (10, 0.5, 8)]:
        assert ring_bits(n, bound, frac) == math.ceil(math.log2(2 * n * bound * 2 ** frac)) + 1
    with pytest.raises(ValueError, match="more than 62"):
        ring_bits(10**6, 1e6, 30)
    with pytest.raises(ValueError, match="raise frac"):
        ring_bits(3, 0.25, 1)
    with pytest.raises(ValueError, match="n_clients"):
        ring_bits(0, 1.0, 8)


def test_decoded_sum_is_within_half_a_step_per_client_over_seeded_trials():
    g = torch.Generator().manual_seed(12)
    worst = 0.0
    for trial in range(200):
        n = int(torch.randint(1, 40, (1,), generator=g))
        bound = float(torch.empty(1).uniform_(0.1, 8.0, generator=g))
        frac = int(torch.randint(4, 24, (1,), generator=g))
        fp = FixedPoint(n, bound, frac)
        xs = (torch.rand(n, 64, generator=g, dtype=torch.float64) * 2 - 1) * bound
        xs[0, :2] = torch.tensor([bound, -bound], dtype=torch.float64)  # the extremes, all clients
        xs[:, 2] = bound
        xs[:, 3] = -bound
        total = fp.decode(ring_sum([fp.encode(x) for x in xs], fp.bits))
        err = float((total - xs.sum(0)).abs().max())
        assert err <= n * fp.step / 2, (trial, n, bound, frac, err)
        worst = max(worst, err / (n * fp.step))
    assert worst > 0.05  # the bound is exercised, not vacuous


def test_encode_decode_negative_numbers_twos_complement():
    fp = FixedPoint(2, bound=1.0, frac=4)
    y = fp.encode(torch.tensor([-1.0, -0.0625, 0.0, 0.0625, 1.0]))
    assert y.tolist() == [2**fp.bits - 16, 2**fp.bits - 1, 0, 1, 16]
    assert fp.decode(y).tolist() == [-1.0, -0.0625, 0.0, 0.0625, 1.0]


def test_the_sum_of_n_extremes_does_not_wrap_but_more_clients_would():
    fp = FixedPoint(5, bound=3.0, frac=10)
    top = fp.encode(torch.tensor([3.0, -3.0]))
    assert fp.decode(ring_sum([top] * 5, fp.bits)).tolist() == [15.0, -15.0]
    # far beyond n clients the ring wraps: why the ring is sized for n
    many = 2 ** (fp.bits - 1) // int(3.0 * 2 ** 10) + 1
    assert fp.decode(ring_sum([top] * many, fp.bits))[0] < 0


def test_encode_refuses_out_of_bound_and_non_finite():
    fp = FixedPoint(3, bound=1.0, frac=8)
    with pytest.raises(ValueError, match=r"1 value\(s\) outside \[-1.0, 1.0\], first 1.5 at flat index 2"):
        fp.encode(torch.tensor([0.0, 0.5, 1.5]))
    with pytest.raises(ValueError, match="non-finite.*index 1"):
        fp.encode(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="non-finite"):
        fp.encode(torch.tensor([float("inf")]))
    with pytest.raises(ValueError, match="floating-point"):
        fp.encode(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="outside the ring"):
        fp.decode(torch.tensor([-1]))
