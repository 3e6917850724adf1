"""QSGD (Alistarh et al., "QSGD: communication-efficient SGD via gradient quantization and
encoding", 2017): bits and bytes of its codes, their packing, its error bound and unbiasedness,
and same seed, same packet."""
import math

import pytest
import torch

from test_compression import packets_equal, randn  # tests/ is on sys.path (pytest prepends it)
from toolkit.federated.compression import QSGD, qsgd_bits


@pytest.mark.parametrize("levels,bits", [(1, 2), (2, 4), (3, 4), (7, 4), (8, 8), (16, 8), (127, 8)])
def test_qsgd_codes_bits_and_bytes(levels, bits):
    K, P = 5, 1001
    assert qsgd_bits(levels) == bits
    comp = QSGD(levels)
    packet = comp.compress(randn(K, P), torch.arange(K), generator=torch.Generator().manual_seed(0))
    assert packet.bits == bits and packet.levels == levels and packet.numel == P
    assert packet.codes.dtype == torch.uint8 and packet.codes.shape == (K, math.ceil(P * bits / 8))
    assert packet.norms.dtype == torch.float32 and packet.norms.shape == (K,)
    assert packet.nbytes == K * 4 + K * math.ceil(P * bits / 8)
    codes = packet.unpack()
    assert codes.shape == (K, P)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2 * levels
    assert int(codes.max()) > levels and int(codes.min()) < levels  # both signs used


def test_qsgd_packs_codes_little_end_first():
    # one non-zero coordinate: r is exactly 0 or levels, so no randomness is involved
    u = torch.tensor([[0.0, -3.0, 0.0, 0.0, 0.0]])
    packet = QSGD(1).compress(u, torch.tensor([0]))
    # codes = sign * level + 1 = 1, 0, 1, 1, 1 -> byte 0 = 1 | 0 << 2 | 1 << 4 | 1 << 6, byte 1 = 1
    assert packet.codes.tolist() == [[1 | 1 << 4 | 1 << 6, 1]]
    assert packet.norms.tolist() == [3.0]
    assert torch.equal(packet.decode(), u)
    p4 = QSGD(7).compress(u, torch.tensor([0]))
    assert p4.codes.tolist() == [[7 | 0 << 4, 7 | 7 << 4, 7]]


def test_qsgd_decode_is_within_norm_over_levels_of_the_input():
    K, P = 8, 5000
    u = randn(K, P) * torch.logspace(-3, 2, K)[:, None]
    u[0] *= 1e-27  # squares underflow float32
    u[-1] *= 1e17  # squares overflow float32
    for levels in (1, 3, 16, 127):
        packet = QSGD(levels).compress(u, torch.arange(K), generator=torch.Generator().manual_seed(levels))
        dense = packet.decode()
        norms = u.double().norm(dim=1).float()
        assert torch.allclose(packet.norms, norms, rtol=1e-5, atol=0)
        bound = norms[:, None] / levels
        assert bool(((dense - u).abs() <= bound * (1 + 1e-5)).all())
        assert bool((torch.sign(dense) * torch.sign(u) >= 0).all())  # never flips a sign


def test_qsgd_is_unbiased():
    n, P, levels = 2000, 64, 2
    x = randn(P, seed=3)
    comp = QSGD(levels)
    packet = comp.compress(x.expand(n, P).contiguous(), torch.arange(n), generator=torch.Generator().manual_seed(0))
    mean = packet.decode().double().mean(dim=0)
    norm = float(x.norm())
    r = x.abs().double() / norm * levels
    frac = r - r.floor()
    std = norm / levels * (frac * (1 - frac)).sqrt() / math.sqrt(n)  # std of the mean per coordinate
    assert bool(((mean - x.double()).abs() <= 5 * std + 1e-6).all())
    # deterministic rounding to the nearest level would be far off somewhere
    nearest = (r.round() * x.sign().double() * norm / levels)
    assert float((nearest - x.double()).abs().max()) > 20 * float(std.max())


def test_qsgd_same_seed_same_packet_other_seed_other_packet():
    u = randn(10, 777)
    clients = torch.arange(10)
    a = QSGD(8).compress(u, clients, generator=torch.Generator().manual_seed(42))
    b = QSGD(8).compress(u, clients, generator=torch.Generator().manual_seed(42))
    c = QSGD(8).compress(u, clients, generator=torch.Generator().manual_seed(43))
    assert packets_equal(a, b)
    assert not torch.equal(a.codes, c.codes)
    torch.manual_seed(5)
    d = QSGD(8).compress(u, clients)
    torch.manual_seed(5)
    assert packets_equal(d, QSGD(8).compress(u, clients))  # global RNG without a generator
