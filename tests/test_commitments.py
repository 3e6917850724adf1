"""Hash commitments (defenses.commitments): binding, hiding, canonical encoding, named failures."""
import hashlib
import re

import pytest
import torch

from defenses.commitments import NONCE_BYTES, Opening, check_openings, commit, encode_tensor, verify


@pytest.fixture
def update():
    return torch.randn(4, 5, generator=torch.Generator().manual_seed(0))


def test_opens_with_what_was_committed(update):
    c, opening = commit(update, "client:3", 7)
    assert isinstance(c, bytes) and len(c) == 32
    assert len(opening.nonce) == NONCE_BYTES == 32
    assert verify(c, update.clone(), opening, "client:3", 7)


def test_binding_changed_tensor_id_round_or_nonce_fails(update):
    c, opening = commit(update, "client:3", 7)
    changed = update.clone()
    changed[2, 1] = torch.nextafter(changed[2, 1], torch.tensor(10.0))  # one ulp
    assert not verify(c, changed, opening, "client:3", 7)
    assert not verify(c, update, opening, "client:4", 7)
    assert not verify(c, update, opening, "client:3", 8)
    flipped = bytes([opening.nonce[0] ^ 1]) + opening.nonce[1:]
    assert not verify(c, update, Opening(flipped), "client:3", 7)
    assert not verify(bytes([c[0] ^ 1]) + c[1:], update, opening, "client:3", 7)


def test_hiding_two_commits_of_the_same_tensor_differ(update):
    (c1, o1), (c2, o2) = commit(update, "client:0", 0), commit(update, "client:0", 0)
    assert c1 != c2 and o1.nonce != o2.nonce
    assert verify(c1, update, o1, "client:0", 0) and not verify(c1, update, o2, "client:0", 0)
    # the commitment is not the bare hash of the tensor's encoding
    assert c1 != hashlib.sha256(encode_tensor(update)).digest()
    assert "nonce=<32 bytes>" in repr(o1) and o1.nonce.hex() not in repr(o1)


def test_dtype_and_shape_are_part_of_the_commitment(update):
    c, opening = commit(update, "client:0", 1)
    assert not verify(c, update.double(), opening, "client:0", 1)  # same values, float64
    assert torch.equal(update.double().float(), update)
    assert not verify(c, update.reshape(-1), opening, "client:0", 1)  # same entries, other shape
    assert verify(c, update.T.contiguous().T, opening, "client:0", 1)  # strides are not
    z, oz = commit(torch.zeros(2), "client:0", 1)
    assert not verify(z, torch.tensor([0.0, -0.0]), oz, "client:0", 1)


def test_encoding_is_canonical_across_layout_and_grad(update):
    view = update.T.contiguous().T  # same values and shape, other strides
    assert not view.is_contiguous()
    assert encode_tensor(view) == encode_tensor(update)
    assert encode_tensor(update.clone().requires_grad_()) == encode_tensor(update)
    assert encode_tensor(torch.ones(2, 0)) != encode_tensor(torch.ones(0, 2))
    assert encode_tensor(torch.tensor(1.0)) != encode_tensor(torch.tensor([1.0]))
    assert encode_tensor(torch.tensor([1], dtype=torch.int32)) != encode_tensor(torch.tensor([1.0]))
    z = torch.tensor([1 + 2j, 4 - 3j])
    assert encode_tensor(z.conj()) == encode_tensor(torch.tensor([1 - 2j, 4 + 3j]))  # lazy conj resolved
    assert encode_tensor(-update) == encode_tensor((-update).clone())


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int64, torch.float16, torch.bfloat16,
                                   torch.float32, torch.complex64])
def test_every_dense_dtype_commits_and_opens(dtype):
    t = torch.arange(6).reshape(2, 3).to(dtype)
    c, opening = commit(t, "client:0", 0)
    assert verify(c, t.clone(), opening, "client:0", 0)
    assert not verify(c, torch.zeros_like(t), opening, "client:0", 0)


def test_check_openings_releases_all_when_all_verify(update):
    tensors = {f"client:{i}": update + i for i in range(3)}
    made = {cid: commit(t, cid, 2) for cid, t in tensors.items()}
    released = check_openings({c: m[0] for c, m in made.items()}, {c: (tensors[c], m[1]) for c, m in made.items()}, 2)
    assert released.keys() == tensors.keys()
    assert all(torch.equal(released[c], tensors[c]) for c in tensors)


def test_check_openings_names_every_failing_client(update):
    tensors = {f"client:{i}": update + i for i in range(5)}
    made = {cid: commit(t, cid, 2) for cid, t in tensors.items()}
    commitments = {c: m[0] for c, m in made.items()}
    openings = {c: (tensors[c], m[1]) for c, m in made.items()}
    openings["client:1"] = (tensors["client:1"] * 2, made["client:1"][1])  # tampered tensor
    openings["client:3"] = (tensors["client:3"], made["client:4"][1])  # someone else's nonce
    del openings["client:4"]  # committed, never opened
    openings["client:9"] = (update, made["client:0"][1])  # opened, never committed
    openings["client:2"] = (tensors["client:2"], "not an opening")
    with pytest.raises(ValueError) as info:
        check_openings(commitments, openings, 2)
    msg = str(info.value)
    assert "5 client(s)" in msg and "nothing released" in msg
    named = set(re.findall(r"'(client:\d)'", msg))
    assert named == {"client:1", "client:2", "client:3", "client:4", "client:9"}
    assert "'client:0'" not in msg


def test_check_openings_rejects_a_replayed_round(update):
    c, o = commit(update, "client:0", 1)
    with pytest.raises(ValueError, match=r"round 2: .*'client:0' \(opening does not match"):
        check_openings({"client:0": c}, {"client:0": (update, o)}, 2)


@pytest.mark.parametrize("call, match", [
    (lambda u: commit(u.numpy(), "client:0", 0), "torch.Tensor"),
    (lambda u: commit(u.to_sparse(), "client:0", 0), "dense"),
    (lambda u: commit(u, "", 0), "client_id"),
    (lambda u: commit(u, 3, 0), "client_id"),
    (lambda u: commit(u, "client:0", -1), "round"),
    (lambda u: commit(u, "client:0", True), "round"),
    (lambda u: commit(u, "client:0", 1.0), "round"),
    (lambda u: verify(b"short", u, Opening(b"\0" * 32), "client:0", 0), "commitment"),
    (lambda u: verify(b"\0" * 32, u, b"\0" * 32, "client:0", 0), "Opening"),
    (lambda u: Opening(b"\0" * 16), "32 bytes"),
    (lambda u: check_openings([], {}, 0), "mappings"),
    (lambda u: check_openings({}, {}, -2), "round"),
])
def test_bad_input_is_a_clear_error(update, call, match):
    with pytest.raises(ValueError, match=match):
        call(update)
