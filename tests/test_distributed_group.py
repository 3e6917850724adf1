"""toolkit.distributed's group: joining, registration, agreement, size limits, timeouts and dead peers
(real processes on 127.0.0.1, free ports, hard timeouts)."""
from __future__ import annotations

import signal
import time

import pytest
import torch

from distributed_helpers import collect, free_port, join_for_test as _join, ran, run_pair, start

T = "test_distributed_group"
PAIR = [("mixed", None), ("short", None), ("unreceived", None), ("limit", "aes-gcm")]


@pytest.fixture(scope="module")
def pair():
    """Every two-process scenario here, run by one pair of processes (one group and port each)."""
    return run_pair(T, PAIR)


def scenario_unreceived(rank, world, port, _):
    """rank 0 sends 8 MB that rank 1 never receives: the send times out naming rank 1."""
    with _join(rank, world, port) as group:
        if rank == 1:
            group.wait_key("sent", 20)
            return None
        t0 = time.monotonic()
        try:
            group.send(torch.zeros(1 << 21), 1, kind="unwanted", timeout=1.0)
            message = "no error"
        except TimeoutError as e:
            message = str(e)
        seconds = time.monotonic() - t0
        try:  # gloo closed the connection after the timeout: the next message to rank 1 fails at once
            group.send(torch.zeros(3), 1, kind="after", timeout=5.0)
            after = "no error"
        except ConnectionError as e:
            after = str(e)
        group.set("sent", "1")
        return {"message": message, "seconds": seconds, "after": after}


def test_a_send_nobody_receives_times_out_naming_the_peer(pair):
    result, _ = ran(pair, ("unreceived", None))
    assert "rank 1 did not answer within 1 s (sending 'unwanted')" in result["message"]
    assert result["seconds"] < 10
    assert "lost the connection to rank 1 (sending 'after')" in result["after"]


def scenario_victim(rank, world, port):
    """rank 1 joins and waits to be killed; rank 0 waits for a message from it."""
    with _join(rank, world, port) as group:
        if rank == 1:
            print("READY", flush=True)
            time.sleep(120)
        t0 = time.monotonic()
        try:
            group.recv(1, like=torch.zeros(3), kind="weights", timeout=30.0)
            message = "no error"
        except (ConnectionError, TimeoutError) as e:
            message = f"{type(e).__name__}: {e}"
        return {"message": message, "seconds": time.monotonic() - t0}


def test_a_killed_peer_is_an_error_naming_it_not_a_hang():
    port = free_port()
    procs = [start(f"{T}:scenario_victim", r, 2, port) for r in (0, 1)]
    try:
        assert procs[1].stdout.readline().strip() == "READY"  # joined (the group is open)
        time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(timeout=10)
        (result,) = collect(procs[:1], timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert "rank 1" in result["message"] and "'weights'" in result["message"], result
    assert result["seconds"] < 30


def scenario_limit(rank, world, port, encrypt):
    """rank 1 accepts at most 1,000 bytes per message; rank 0 announces 4,016 (4,000 and the tag)."""
    with _join(rank, world, port, encrypt) as group:
        if rank == 0:
            with pytest.raises((TimeoutError, ConnectionError)):  # rank 1 never takes the rest, then leaves
                group.send(torch.zeros(1000), 1, kind="too-big", timeout=3.0)
            group.wait_key("checked", 20)
            return None
        group.max_bytes = 1000
        try:
            group.recv(0, kind="too-big")
            message = "no error"
        except ValueError as e:
            message = str(e)
        group.set("checked", "1")
        return message


def test_a_message_over_the_size_limit_is_refused_before_it_is_received(pair):
    _, message = ran(pair, ("limit", "aes-gcm"))
    assert "rank 0 announced a 4,016-byte message ('too-big'), over the 1,000-byte limit" in message


def scenario_join(rank, world, port, encrypt, duplicate=False):
    """Registration: a second process claiming a taken rank is refused; agree() and the store.
    With ``duplicate``, rank 0 keeps the store up until the second claim of rank 1 was refused."""
    try:
        group = _join(rank, world, port, encrypt)
    except Exception as e:  # noqa: BLE001  (the test reads which error each process saw)
        return {"error": f"{type(e).__name__}: {e}"}
    with group:
        group.set(f"hello/{rank}", f"from {rank}")
        agreed = group.agree("leader", f"rank {rank}")
        again = group.agree("leader", "a late proposal")
        other = group.get(f"hello/{1 - rank}")
        try:
            group.get("missing", timeout=0.2)
        except TimeoutError as e:
            missing = str(e)
        group.set(f"agreed/{rank}", agreed)
        group.wait_key(f"agreed/{1 - rank}", 10)  # stay until the other has agreed
        deadline = time.monotonic() + 90
        while duplicate and rank == 0 and not group.store.check(["leaklab/refused/1"]):
            assert time.monotonic() < deadline, "the second rank 1 never tried to join"
            time.sleep(0.05)
        return {"agreed": agreed, "again": again, "other": other, "missing": missing}


def test_registering_a_rank_twice_is_refused_and_agree_has_one_winner():
    port = free_port()
    results = collect([start(f"{T}:scenario_join", r, 2, port, [None, True]) for r in (0, 1, 1)], timeout=150)
    errors = [r["error"] for r in results if "error" in r]
    joined = [r for r in results if "error" not in r]
    assert len(errors) == 1 and "rank 1 has already joined this group" in errors[0]
    assert len(joined) == 2 and {r["other"] for r in joined} == {"from 0", "from 1"}
    winners = {r["agreed"] for r in joined} | {r["again"] for r in joined}
    assert len(winners) == 1 and winners < {"rank 0", "rank 1"}
    assert all("store key 'missing' was not set within 0.2 s" in r["missing"] for r in joined)


def scenario_mixed(rank, world, port, _):
    """rank 0 asks for encryption, rank 1 does not."""
    return scenario_join(rank, world, port, "aes-gcm" if rank == 0 else None)


def test_processes_must_agree_on_encryption(pair):
    results = ran(pair, ("mixed", None))
    assert all("error" in r for r in results)
    assert "rank 0 joined with encrypt='aes-gcm' but rank 1 with 'none'" in results[0]["error"]


def scenario_short(rank, world, port, _):
    """Both processes join a group of 3 that rank 2 never joins."""
    try:
        _join(rank, 3, port, timeout=2.0)
    except (TimeoutError, ConnectionError) as e:  # rank 1 may see the store's host (rank 0) leave first
        return str(e)
    return "joined"


def test_a_peer_that_never_joins_is_named(pair):
    host, other = ran(pair, ("short", None))
    assert "rank(s) [2] did not join" in host and "rank(s) [2]" in other
    port = free_port()
    (message,) = collect([start(f"{T}:scenario_alone", 0, 3, port)], timeout=60)
    assert "rank(s) [1, 2] did not join" in message


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=2, world_size=2), "rank must be in"), (dict(rank=0, world_size=0), "rank must be in"),
    (dict(rank=0, world_size=2, port=0), "port must be in"), (dict(rank=0, world_size=2, timeout=0), "timeout"),
    (dict(rank=0, world_size=2, encrypt="aes"), "encrypt must be one of"),
    (dict(rank="0", world_size=2), "rank must be an int")])
def test_join_rejects_bad_arguments(kwargs, match):
    from toolkit.distributed import join
    with pytest.raises((ValueError, TypeError), match=match):
        join(**{"port": 29999, **kwargs})


def scenario_alone(rank, world, port):
    try:
        _join(rank, world, port, timeout=2.0)
    except TimeoutError as e:
        return str(e)
    return "joined"
