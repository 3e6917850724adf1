"""toolkit.distributed.crypto and framing, in one process: per-pair keys, nonces, authentication, headers."""
from __future__ import annotations

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from toolkit.distributed import crypto, framing


def pair(cipher):
    a, b = crypto.KeyExchange(cipher), crypto.KeyExchange(cipher)
    return a, b, a.derive(0, {1: b.public}), b.derive(1, {0: a.public})


def payload(n=1000, seed=0):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("cipher", ["aes-gcm", "chacha20-poly1305"])
def test_round_trip_and_the_documented_construction(cipher):
    a, b, ca, cb = pair(cipher)
    data = payload()
    sealed = ca.seal(data, dst=1, seq=5, aad=b"header")
    assert sealed.numel() == data.numel() + framing.TAG_BYTES
    assert torch.equal(cb.open(sealed, src=0, seq=5, aad=b"header", kind="w"), data)
    # the construction the docstring names: HKDF-SHA256 over X25519, nonce = 96-bit big-endian seq
    shared = a._private.exchange(X25519PublicKey.from_public_bytes(b.public))
    key = crypto.pair_key(shared, cipher, 0, 1, a.public, b.public)
    aead = {"aes-gcm": AESGCM, "chacha20-poly1305": ChaCha20Poly1305}[cipher](key)
    assert aead.decrypt((5).to_bytes(12, "big"), sealed.numpy().tobytes(), b"header") == data.numpy().tobytes()
    assert crypto.nonce(5) == (5).to_bytes(12, "big")


def test_keys_are_per_direction_per_pair_and_per_cipher():
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    pa, pb = (k.public_key().public_bytes_raw() for k in (a, b))
    shared = a.exchange(b.public_key())
    assert shared == b.exchange(a.public_key())
    keys = {crypto.pair_key(shared, "aes-gcm", 0, 1, pa, pb), crypto.pair_key(shared, "aes-gcm", 1, 0, pb, pa),
            crypto.pair_key(shared, "chacha20-poly1305", 0, 1, pa, pb),
            crypto.pair_key(shared, "aes-gcm", 0, 2, pa, pb)}
    assert len(keys) == 4 and all(len(k) == 32 for k in keys)


def test_nonces_never_repeat_and_same_plaintext_encrypts_differently():
    assert len({crypto.nonce(s) for s in range(10_000)}) == 10_000
    with pytest.raises(ValueError, match="out of range"):
        crypto.nonce(-1)
    _, _, ca, cb = pair("aes-gcm")
    data = payload()
    c0, c1 = ca.seal(data, dst=1, seq=0, aad=b""), ca.seal(data, dst=1, seq=1, aad=b"")
    assert not torch.equal(c0, c1)
    back = cb.seal(data, dst=0, seq=0, aad=b"")  # the other direction, same seq: another key
    assert not torch.equal(c0, back)


@pytest.mark.parametrize("cipher", ["aes-gcm", "chacha20-poly1305"])
def test_anything_changed_fails_authentication_naming_the_sender(cipher):
    _, _, ca, cb = pair(cipher)
    sealed = ca.seal(payload(), dst=1, seq=3, aad=b"hdr")
    flipped = sealed.clone()
    flipped[17] ^= 0x40
    for raw, seq, aad in [(flipped, 3, b"hdr"), (sealed, 4, b"hdr"), (sealed, 3, b"hdR"), (sealed[:10], 3, b"hdr")]:
        with pytest.raises(ValueError, match=r"message 'weights' from rank 0 failed authentication"):
            cb.open(raw, src=0, seq=seq, aad=aad, kind="weights")
    outsider = crypto.KeyExchange(cipher).derive(1, {0: crypto.KeyExchange(cipher).public})
    with pytest.raises(ValueError, match="failed authentication"):
        outsider.open(sealed, src=0, seq=3, aad=b"hdr", kind="weights")


def test_bad_key_material_and_cipher_names():
    with pytest.raises(ValueError, match="cipher must be one of"):
        crypto.KeyExchange("rot13")
    with pytest.raises(ValueError, match="rank 3 published a malformed X25519 public key"):
        crypto.KeyExchange("aes-gcm").derive(0, {3: b"short"})


def test_header_round_trip_and_bad_frames():
    t = torch.zeros(2, 3, 4, dtype=torch.bfloat16)
    words = framing.make_header(t, cipher=1, seq=9, src=2, dst=0, kind="activations")
    h = framing.Header(words, src=2)
    assert (h.shape, h.dtype, h.kind, h.seq, h.src, h.dst) == ((2, 3, 4), torch.bfloat16, "activations", 9, 2, 0)
    assert h.nbytes == t.nbytes + framing.TAG_BYTES and h.plain_nbytes == t.nbytes
    assert h.aad(src=2, dst=0, seq=9) == words.numpy().tobytes()
    assert h.aad(src=2, dst=0, seq=10) != words.numpy().tobytes()
    with pytest.raises(ValueError, match="at most 64 UTF-8 bytes"):
        framing.make_header(t, cipher=0, seq=0, src=0, dst=1, kind="k" * 65)
    with pytest.raises(ValueError, match="at most 8"):
        framing.make_header(torch.zeros([1] * 9), cipher=0, seq=0, src=0, dst=1, kind="")
    with pytest.raises(TypeError, match="cannot send dtype"):
        framing.make_header(torch.zeros(2, dtype=torch.uint16), cipher=0, seq=0, src=0, dst=1, kind="")
    bad = words.clone()
    bad[0] = 7
    with pytest.raises(ValueError, match="from rank 2 is not a LeakLab frame"):
        framing.Header(bad, src=2)
    bad = words.clone()
    bad[7] += 1
    with pytest.raises(ValueError, match="does not fit shape"):
        framing.Header(bad, src=2)
    bad = words.clone()
    bad[5] = 99
    with pytest.raises(ValueError, match="unknown dtype code 99"):
        framing.Header(bad, src=2)


@pytest.mark.parametrize("t", [torch.randn(3, 5), torch.tensor(True), torch.arange(6).reshape(2, 3)[:, 1],
                               torch.zeros(0, 2, dtype=torch.int32), torch.randn(4, dtype=torch.complex64)])
def test_bytes_round_trip(t):
    raw = framing.as_bytes(t)
    assert raw.dtype == torch.uint8 and raw.numel() == t.nbytes
    back = framing.from_bytes(raw.clone(), t.dtype, tuple(t.shape))
    assert torch.equal(back, t)
