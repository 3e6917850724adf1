"""CKKS aggregation (defenses.homomorphic): exact-enough sums, a server that cannot decrypt, HE + DP noise."""
import math
import struct

import pytest
import tenseal as ts
import torch

from defenses.homomorphic import CKKSClient, CKKSParameters, CKKSServer, KeyHolder, decrypt

TOLERANCE = 1e-6  # the module docstring's stated max abs error for 10 clients x 10k values


@pytest.fixture(scope="module")
def holder():
    return KeyHolder()


@pytest.fixture(scope="module")
def public(holder):
    return holder.public_context()


def _sum(holder, public, vectors, noise_std=0.0, generator=None):
    client, server = CKKSClient(public), CKKSServer(public)
    cts = [client.encrypt(v, noise_std=noise_std, generator=generator) for v in vectors]
    return holder.decrypt(server.aggregate(cts))


def test_defaults_and_slot_count():
    p = CKKSParameters()
    assert (p.poly_modulus_degree, p.global_scale, p.slot_count) == (8192, 2.0 ** 40, 4096)
    assert p.coeff_mod_bit_sizes == (60, 40, 60)


@pytest.mark.parametrize("kwargs, name", [
    ({"poly_modulus_degree": 5000}, "poly_modulus_degree"),
    ({"poly_modulus_degree": 8192.0}, "poly_modulus_degree"),
    ({"global_scale": 0.5}, "global_scale"),
    ({"global_scale": float("nan")}, "global_scale"),
    ({"global_scale": 2.0 ** 60}, "global_scale"),
    ({"coeff_mod_bit_sizes": (60,)}, "coeff_mod_bit_sizes"),
    ({"coeff_mod_bit_sizes": (61, 40, 60)}, "coeff_mod_bit_sizes"),
    ({"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": (60, 40, 60)}, "coeff_mod_bit_sizes"),
])
def test_bad_parameters_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CKKSParameters(**kwargs)


def test_ten_clients_ten_thousand_values_sum_within_tolerance(holder, public):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(10_000, generator=g, dtype=torch.float64) for _ in range(10)]
    total = _sum(holder, public, xs)
    assert total.shape == (10_000,) and total.dtype == torch.float64
    err = (total - torch.stack(xs).sum(0)).abs().max().item()
    assert err < TOLERANCE, err


@pytest.mark.parametrize("length", [1, 4096, 4096 * 2 + 5])
def test_chunking_at_and_across_the_slot_count(holder, public, length):
    g = torch.Generator().manual_seed(length)
    xs = [torch.randn(length, generator=g) for _ in range(3)]
    total = _sum(holder, public, xs)
    assert total.shape == (length,)
    assert torch.allclose(total, torch.stack(xs).double().sum(0), atol=TOLERANCE, rtol=0)


def test_public_context_holds_the_public_key_only(public):
    context = ts.context_from(public)
    assert context.has_public_key() and not context.has_secret_key()
    assert not context.has_relin_keys() and not context.has_galois_keys()
    assert len(public) < 500_000  # 0.36 MB measured; 1.09 MB with relinearization keys


def test_server_cannot_decrypt(holder, public):
    server, client = CKKSServer(public), CKKSClient(public)
    agg = server.aggregate([client.encrypt(torch.ones(10)), client.encrypt(torch.ones(10))])
    length, chunks = server.load(agg)
    with pytest.raises(ValueError, match="no secret key"):
        decrypt(chunks, server.context, length)
    with pytest.raises(ValueError, match="secret_key"):  # TenSEAL's own refusal, underneath
        chunks[0].decrypt()
    assert holder.decrypt(agg)[:3].tolist() == pytest.approx([2.0, 2.0, 2.0], abs=TOLERANCE)


def test_public_context_with_secret_key_is_refused():
    private = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 60])
    with pytest.raises(ValueError, match="secret key"):
        CKKSServer(private.serialize(save_secret_key=True))
    with pytest.raises(ValueError, match="bytes"):
        CKKSClient("not bytes")
    with pytest.raises(ValueError, match="deserialize"):
        CKKSClient(b"garbage")


def test_ciphertexts_are_bytes_and_expand_about_15x(public):
    client = CKKSClient(public)
    ct = client.encrypt(torch.zeros(100_000))
    assert isinstance(ct, bytes) and ct.startswith(b"LLCKKS1\x00")
    assert len(client.load(ct)[1]) == 25  # ceil(100,000 / 4,096) chunks
    expansion = len(ct) / (100_000 * 4)  # against float32 plaintext
    assert 13 < expansion < 16, expansion


def test_ciphertext_under_another_key_is_refused(holder, public):
    other = KeyHolder()
    ct = CKKSClient(other.public_context()).encrypt(torch.ones(4))
    with pytest.raises(ValueError, match="another context"):
        CKKSServer(public).aggregate([ct])
    with pytest.raises(ValueError, match="another context"):
        holder.decrypt(ct)


def test_bad_ciphertexts_and_inputs(public):
    client, server = CKKSClient(public), CKKSServer(public)
    ct = client.encrypt(torch.ones(5))
    with pytest.raises(ValueError, match=r"ciphertexts \[1\]"):
        server.aggregate([ct, client.encrypt(torch.ones(6))])
    with pytest.raises(ValueError, match="non-empty sequence"):
        server.aggregate([])
    with pytest.raises(ValueError, match="non-empty sequence"):
        server.aggregate(ct)
    with pytest.raises(ValueError, match="ciphertext 1: ciphertext is truncated"):
        server.aggregate([ct, ct[:-10]])
    head = ct[:struct.calcsize(">8s16sQI")]  # a valid header, then one chunk of garbage
    with pytest.raises(ValueError, match="does not deserialize"):
        server.aggregate([head + struct.pack(">Q", 64) + b"\x07" * 64])
    with pytest.raises(ValueError, match="trailing"):
        server.aggregate([ct + b"x"])
    with pytest.raises(ValueError, match="bad header"):
        server.aggregate([b"x" * 100])
    with pytest.raises(ValueError, match="must be bytes"):
        server.aggregate(["text"])
    with pytest.raises(ValueError, match="non-finite"):
        client.encrypt(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="1-D"):
        client.encrypt(torch.ones(2, 3))
    with pytest.raises(ValueError, match="1-D"):
        client.encrypt(torch.ones(0))
    with pytest.raises(ValueError, match="noise_std"):
        client.encrypt(torch.ones(3), noise_std=-1.0)
    with pytest.raises(ValueError, match="torch.Generator"):
        client.encrypt(torch.ones(3), noise_std=0.1)


def test_hybrid_noise_std_is_sqrt_n_sigma(holder, public):
    n, sigma, length = 10, 0.5, 8192
    xs = [torch.full((length,), float(i)) for i in range(n)]
    total = _sum(holder, public, xs, noise_std=sigma, generator=torch.Generator().manual_seed(1))
    residual = total - torch.stack(xs).double().sum(0)
    expected = math.sqrt(n) * sigma
    # 8192 draws: the sample std's relative standard error is 1/sqrt(2 * 8192) = 0.8%; 3% is ~4 of them.
    assert abs(residual.std().item() / expected - 1) < 0.03, residual.std().item()
    assert abs(residual.mean().item()) < 4 * expected / math.sqrt(length)


def test_same_seed_same_noisy_sum(holder, public):
    xs = [torch.ones(100) for _ in range(3)]
    a = _sum(holder, public, xs, noise_std=0.1, generator=torch.Generator().manual_seed(7))
    b = _sum(holder, public, xs, noise_std=0.1, generator=torch.Generator().manual_seed(7))
    c = _sum(holder, public, xs, noise_std=0.1, generator=torch.Generator().manual_seed(8))
    assert (a - b).abs().max().item() < TOLERANCE
    assert (a - c).abs().max().item() > 0.01


def test_magnitude_bound_refused_above_exact_below_and_wraps_far_beyond(holder, public):
    top = CKKSParameters().max_magnitude
    assert top == 2.0 ** 58 and CKKSClient(public).max_magnitude == top
    with pytest.raises(ValueError, match="max_magnitude"):
        CKKSClient(public).encrypt(torch.tensor([1.0, -top]))
    near = torch.full((4,), 0.49 * top, dtype=torch.float64)
    total = _sum(holder, public, [near, -near / 2, near])  # |sum| = 0.735 max_magnitude
    assert torch.allclose(total, 1.5 * near, rtol=1e-9, atol=0)
    wrapped = _sum(holder, public, [2 * near] * 4)  # each client below the bound, the sum 4x above
    assert ((wrapped - 8 * near).abs() / (8 * near)).min().item() > 0.5
