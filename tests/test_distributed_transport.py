"""toolkit.distributed across real processes: 2 ranks on 127.0.0.1 (subprocesses, free port, hard timeouts)."""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor

from distributed_helpers import join_for_test as _join, ran, run_pair
from toolkit.distributed import framing
from toolkit.messages import Packet
from toolkit.wire import Wire

T = "test_distributed_transport"
HOSTS = {"client": 0, "server": 1, "a": 0, "b": 0, "c": 1}


def _values(g: torch.Generator) -> dict[str, Tensor]:
    return {"f32": torch.randn(3, 4, generator=g), "i64": torch.randint(-9, 9, (5,), generator=g),
            "bool": torch.rand(2, 3, generator=g) > 0.5, "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
            "scalar": torch.tensor(3.5, dtype=torch.float64), "empty": torch.zeros(0, 4),
            "u8": torch.randint(0, 255, (2, 2, 2), generator=g, dtype=torch.uint8),
            # around the end of the first message (framing.INLINE payload bytes), with and without the tag
            **{f"edge{n}": torch.randint(0, 255, (n,), generator=g, dtype=torch.uint8)
               for n in (framing.INLINE - framing.TAG_BYTES, framing.INLINE - 1, framing.INLINE, framing.INLINE + 1)},
            "big": torch.randn(300, 500, generator=g)}


PAIR = [("basic", None), ("basic", "aes-gcm"), ("basic", "chacha20-poly1305"), ("tamper", "aes-gcm"),
        ("tamper", "chacha20-poly1305"), ("tamper", None), ("wire", None), ("wire", "aes-gcm"), ("errors", None)]


@pytest.fixture(scope="module")
def pair():
    """Every two-process scenario here, run by one pair of processes (one group and port each)."""
    return run_pair(T, PAIR)


def scenario_basic(rank, world, port, encrypt):
    """rank 0 sends every dtype to rank 1; rank 1 checks them and answers through an any-source receive."""
    values = _values(torch.Generator().manual_seed(7))
    out = {}
    with _join(rank, world, port, encrypt) as group:
        if rank == 0:
            for name, t in values.items():
                group.send(t, 1, kind=name)
            got, src = group.recv(None, kind="reply")
            out["reply"], out["src"] = got.tolist(), src
        else:
            for name, t in values.items():
                got, src = group.recv(0, like=t if name != "u8" else None, kind=name)
                assert src == 0 and got.dtype == t.dtype and got.shape == t.shape, name
                out[name] = bool(torch.equal(got, t))
            group.send(torch.arange(4.0), 0, kind="reply")
    return out


@pytest.mark.parametrize("encrypt", [None, "aes-gcm", "chacha20-poly1305"])
def test_send_recv_every_dtype_and_any_source(pair, encrypt):
    sender, receiver = ran(pair, ("basic", encrypt))
    assert receiver == {name: True for name in _values(torch.Generator().manual_seed(7))}
    assert sender == {"reply": [0.0, 1.0, 2.0, 3.0], "src": 1}


def scenario_tamper(rank, world, port, encrypt):
    """rank 0 sends: a good message, one with a flipped payload byte, one with a relabelled header,
    a good one and its replay, then a good one; rank 1 reports what each receive did."""
    with _join(rank, world, port, encrypt) as group:
        if rank == 0:
            post = group._post
            sent = []

            def tamper(how):
                def patched(header, payload, dst, kind):
                    header, payload = header.clone(), payload.clone()
                    if how == "payload":
                        payload[len(payload) // 2] ^= 1
                    elif how == "header":
                        header[16] ^= 1  # first byte of the kind
                    sent.append((header, payload))
                    return post(header, payload, dst, kind)
                return patched

            for i, how in enumerate(["none", "payload", "header", "none"]):
                group._post = tamper(how)
                group.send(torch.full((256,), float(i)), 1, kind=f"m{i}")
            group._post = post
            post(*sent[-1], 1, "m3").wait(5.0)  # replay the last good frame as is
            group.send(torch.full((256,), 5.0), 1, kind="m5")
            return None
        out = []
        for i in range(6):
            try:
                got, _ = group.recv(0, like=torch.zeros(256))
                out.append(got.double().sum().item() / 256)
            except ValueError as e:
                out.append(str(e))
        return out


@pytest.mark.parametrize("encrypt", ["aes-gcm", "chacha20-poly1305"])
def test_tampered_or_replayed_message_fails_authentication(pair, encrypt):
    _, got = ran(pair, ("tamper", encrypt))
    assert got[0] == 0.0 and got[3] == 3.0 and got[5] == 5.0  # the good ones, also after the rejections
    for i in (1, 2, 4):
        assert "failed authentication" in got[i] and "from rank 0" in got[i], got[i]
    assert "'m1'" in got[1] and "'m3'" in got[4] and "replay" in got[4]


def test_without_encryption_tampering_goes_unnoticed_but_replays_do_not(pair):
    """What the encryption option is for: a plain group accepts a modified payload."""
    _, got = ran(pair, ("tamper", None))
    assert got[0] == 0.0 and isinstance(got[1], float) and got[1] != 1.0  # the flipped bit was accepted
    assert got[2] == 2.0  # a relabelled kind is just another kind
    assert "was rejected as a replay: sequence number 3, expected 4" in got[4]  # the replay repeats a sequence number
    assert got[5] == 5.0


@dataclass
class Sparse(Packet):
    indices: Tensor
    values: Tensor
    size: int = 10


def protocol(wire: Wire, hosted: set[str] | None) -> None:
    """A little SPMD protocol touching every path: single, Packet, stacked, broadcast sends.
    ``hosted`` None is the in-process run; else parties not in it compute on shadows (zeros)."""
    g = torch.Generator().manual_seed(3)

    def real(party, t):
        return t if hosted is None or party in hosted else torch.zeros_like(t)

    for step in range(2):
        x = real("client", torch.randn(4, 3, generator=g))
        z = wire.send(x, sender="client", receiver="server", kind="activations")
        wire.send(real("server", 2 * z + 1), sender="server", receiver="client", kind="gradients")
        idx = torch.randperm(10, generator=g)[:3]
        wire.send(Sparse(real("client", idx), real("client", torch.randn(3, generator=g))),
                  sender="client", receiver="server", kind="update")
        rows = torch.randn(3, 5, generator=g)
        rows = torch.stack([real(p, r) for p, r in zip("abc", rows)])
        up = wire.send(rows, sender=("a", "b", "c"), receiver="server", kind="stacked-up")
        wire.send(real("server", up.flip(0) - 1), sender="server", receiver=("a", "b", "c"), kind="stacked-down")
        packets = Sparse(torch.randint(0, 10, (3, 2), generator=g), torch.randn(3, 2, generator=g))
        packets = Sparse(*(torch.stack([real(p, r) for p, r in zip("abc", f)])
                           for f in (packets.indices, packets.values)))
        wire.send(packets, sender=("a", "b", "c"), receiver="server", kind="stacked-packet")
        wire.broadcast(real("server", up.sum(0)), sender="server", receivers=("a", "b", "c"), kind="weights")
        wire.tick()


def _summary(wire: Wire, hosted: set[str]) -> dict:
    """Ledger, total bytes, and what each hosted party received (exact values)."""
    def value(t):
        return {k: v.tolist() for k, v in t.tensors().items()} if isinstance(t, Packet) else t.tolist()
    got = [[tr.step, tr.sender, tr.receiver, tr.kind, value(tr.tensor)] for tr in wire.observed()
           if tr.receiver in hosted]
    return {"ledger": wire.ledger().values.tolist(), "total": wire.total_bytes, "transfers": len(wire.observed()),
            "sizes": [[tr.kind, tr.nbytes] for tr in wire.observed()], "summary": wire.summary().values.tolist(),
            "received": got}


def scenario_wire(rank, world, port, encrypt):
    from toolkit.distributed import ProcessTransport
    with _join(rank, world, port, encrypt) as group:
        transport = ProcessTransport(group, HOSTS)
        wire = Wire(transport=transport)
        protocol(wire, set(transport.hosted()))
        return {**_summary(wire, set(transport.hosted())), "network": [transport.sent_bytes, transport.received_bytes]}


@pytest.mark.parametrize("encrypt", [None, "aes-gcm"])
def test_wire_across_processes_matches_in_process(pair, encrypt):
    results = ran(pair, ("wire", encrypt))
    reference = Wire()
    protocol(reference, None)
    for rank, result in enumerate(results):
        hosted = {p for p, r in HOSTS.items() if r == rank}
        expected = _summary(reference, hosted)
        assert result["ledger"] == expected["ledger"] and result["total"] == expected["total"] > 0
        assert result["transfers"] == expected["transfers"] and result["sizes"] == expected["sizes"]
        assert result["summary"] == expected["summary"]
        assert result["received"] == expected["received"] and len(expected["received"]) >= 10
    # on the network: transfers between ranks, a broadcast once per receiving rank (server -> a, b: once)
    crossing = {}
    for tr in reference.observed():
        src, dst = HOSTS[tr.sender], HOSTS[tr.receiver]
        if src != dst:
            key = (tr.step, tr.kind, src, dst) if tr.kind == "weights" else (len(crossing),)
            crossing[key] = (src, tr.nbytes)
    sent = [sum(n for src, n in crossing.values() if src == rank) for rank in (0, 1)]
    assert [r["network"] for r in results] == [[sent[0], sent[1]], [sent[1], sent[0]]]
    counted = sum(tr.nbytes for tr in reference.observed() if HOSTS[tr.sender] == 1 and HOSTS[tr.receiver] == 0)
    weights = sum(tr.nbytes for tr in reference.observed(kind="weights") if tr.receiver == "a")
    assert sent[1] == counted - weights > 0  # the Wire counts the weights for a and b; they cross once


def scenario_errors(rank, world, port, encrypt):
    """Shape mismatch (then the channel is still in step), kind mismatch, then a timeout."""
    from toolkit.distributed import ProcessTransport
    out = {}
    with _join(rank, world, port, encrypt) as group:
        transport = ProcessTransport(group, {"client": 0, "server": 1}, timeout=5.0)
        wire = Wire(transport=transport)
        x = torch.ones(3, 4) if rank == 0 else torch.zeros(4, 3)  # the server's shadow has the wrong shape
        try:
            wire.send(x, sender="client", receiver="server", kind="activations")
            out["shape"] = "no error"
        except ValueError as e:
            out["shape"] = str(e)
        y = wire.send(torch.full((2,), 5.0) if rank == 0 else torch.zeros(2), sender="client",
                      receiver="server", kind="next")
        out["next"] = y.tolist()
        if rank == 0:
            group.send(torch.ones(2), 1, kind="weights")
            group.set("go", "1")
        else:
            try:
                group.recv(0, kind="gradients")
                out["kind"] = "no error"
            except ValueError as e:
                out["kind"] = str(e)
            group.wait_key("go", 10)
            try:
                wire.send(torch.zeros(3), sender="nobody", receiver="server", kind="x")
            except ValueError as e:
                out["unknown"] = str(e)
            impatient = Wire(transport=ProcessTransport(group, {"client": 0, "server": 1}, timeout=1.0))
            try:  # the client's process never sends this one
                impatient.send(torch.zeros(2), sender="client", receiver="server", kind="never-sent")
                out["timeout"] = "no error"
            except TimeoutError as e:
                out["timeout"] = str(e)
            group.set("done", "1")
        if rank == 0:
            group.wait_key("done", 20)
    return out


def test_mismatch_and_timeout_errors_name_the_peer(pair):
    client, server = ran(pair, ("errors", None))
    assert client["shape"] == "no error" and client["next"] == [5.0, 5.0]
    msg = server["shape"]
    for part in ("'activations'", "'client'", "'server'", "(4, 3)", "(3, 4)"):
        assert part in msg, (part, msg)
    assert server["next"] == [5.0, 5.0]  # the mismatched payload was drained: still in step
    assert "expected 'gradients' from rank 0, got 'weights'" in server["kind"]
    assert "party 'nobody' has no rank" in server["unknown"]
    for part in ("'server' (rank 1) waited for 'never-sent' from 'client' (rank 0)",
                 "rank 0 did not answer within 1 s"):
        assert part in server["timeout"], server["timeout"]


BANNED = {"pickle", "cPickle", "dill", "marshal", "shelve", "send_object_list", "recv_object_list",
          "broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list", "_object_to_tensor",
          "_tensor_to_object"}


def unpickling_uses(source: str) -> list[str]:
    """Names in code (not docstrings) that unpickle or ship Python objects, and ``torch.load``."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    hits = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
            if node.attr == "load" and isinstance(node.value, ast.Name) and node.value.id == "torch":
                hits.append(f"{node.lineno}: torch.load")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name.split(".")[0] for a in node.names]
            module = node.module if isinstance(node, ast.ImportFrom) else None
            names += [module.split(".")[0]] if module else []
            if module == "torch" and any(a.name == "load" for a in node.names):
                hits.append(f"{node.lineno}: from torch import load")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            names = re.findall(r"\w+", node.value)
        hits += [f"{node.lineno}: {n}" for n in names if n in BANNED]
    return hits


def test_the_pickle_scan_catches_what_it_should():
    bad = "import pickle\nimport torch\nx = torch.load('f')\ngetattr(dist, 'send_object_list')\n"
    assert len(unpickling_uses(bad)) == 3
    assert unpickling_uses('"""pickle, torch.load and recv_object_list are never used."""\nx = 1\n') == []


def test_no_pickle_in_toolkit_distributed():
    """Nothing received is unpickled: no pickle, no object collectives, no torch.load in the package."""
    root = Path(__file__).resolve().parents[1] / "toolkit" / "distributed"
    files = sorted(root.glob("*.py"))
    assert len(files) >= 4
    hits = [f"{f.name}:{h}" for f in files for h in unpickling_uses(f.read_text())]
    assert hits == []


def test_benchmark_quick_mode_prints_every_transport_beside_the_socket_floor():
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "transport.py"), "--quick", "--threads", "1"],
                          capture_output=True, text=True, timeout=180, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if re.match(r"\s*1 [KM]B\s", line)]
    variants = {"in-process", "socket", "process", "aes-gcm", "chacha20-poly1305"}
    assert {(r[0] + " " + r[1], r[2]) for r in rows} == {(s, v) for s in ("1 KB", "1 MB") for v in variants}
    for r in rows:
        x_socket, x_local = float(r[-2]), float(r[-1])
        assert x_socket > 0 and x_local > 0
        if r[2] == "socket":
            assert x_socket == 1.0
        if r[2] == "in-process":
            assert x_local == 1.0
