"""RingTraining across real processes (issue 13): 3 processes on 127.0.0.1 (a free port, hard
timeouts, all killed on failure) through ``python -m toolkit.distributed ring``; the results equal
the in-process RingTraining's for the same seed, with and without a failing node; a killed
process makes the ring re-form; discovery's bad input gives a clear error (real TCPStore, threads)."""
from __future__ import annotations

import datetime
import signal
import threading
from pathlib import Path

import networkx as nx
import pytest
import torch
import torch.distributed as dist

from toolkit.decentralized import RingTraining, topology
from toolkit.distributed.discovery import Roster, data_info, discover, shadow_dataset
from toolkit.distributed.launch import Launch, free_port
from toolkit.distributed.launch import launch
from toolkit.distributed.ring import ABORT_KEY, CRASH_EXIT, LeftRing, StoreLiveness, demo_setup
from toolkit.federated import FedConfig

ROUNDS = 3
ARGS = ["--rounds", str(ROUNDS), "--n-samples", "600", "--seed", "3", "--liveness-timeout", "2", "--timeout", "15"]


def reference(failures=None, *, n_samples=600, rounds=ROUNDS, local_epochs=1) -> RingTraining:
    """The in-process simulation the processes must reproduce."""
    model, parts = demo_setup("loan", 3, n_samples=n_samples, seed=3)
    ring = RingTraining(model, parts, topology.ring(3), config=FedConfig(seed=3, local_epochs=local_epochs))
    ring.fit(rounds, failures=failures)
    return ring


def check_equal(results, ring: RingTraining, survivors) -> None:
    assert [r["node"] for r in results] == list(survivors)
    for r in results:
        v = r["node"]
        assert torch.allclose(torch.tensor(r["weights"]), ring.node_weights[v], atol=1e-6, rtol=0), f"node:{v}"
        assert r["alive"] == ring.alive and r["failed"] == ring.failed and r["order"] == ring.order
        assert r["failed_per_round"] == ring.history["failed"].tolist()
        assert r["bytes"] == ring.wire.total_bytes and r["transfers"] == len(ring.wire)  # the Wire's own counts
        assert r["transcript"] == [[t.step, t.sender, t.receiver, t.kind, list(t.tensor.shape)]
                                   for t in ring.wire.observed()]
        assert r["shadow_data_zero"]  # no process holds a peer's data
    holder = [r for r in results if r["node"] == ring.holder]
    assert len(holder) == 1 and torch.allclose(torch.tensor(holder[0]["model"]), ring.weights, atol=1e-6, rtol=0)
    assert holder[0]["test"]["test_loss"] == pytest.approx(ring.evaluate()["test_loss"], abs=1e-6)
    assert all(r["model"] is None for r in results if r["node"] != ring.holder)


def ring_process(rank, world, addr, port, rounds):
    """One rank of a ring through the library API (join, run_ring), as launch() runs it."""
    from toolkit.distributed import join, run_ring
    from toolkit.distributed.ring import leave

    model, parts = demo_setup("loan", 3, n_samples=600, seed=3)
    group = join(rank, world, addr=addr, port=port, timeout=15.0)
    run = None
    try:
        run = run_ring(group, rank, parts[rank], model, rounds=rounds, config=FedConfig(seed=3),
                       topology=topology.ring(3) if rank == 0 else None, liveness_timeout=2.0)
        return run.summary()
    finally:
        leave(group, run)


def test_three_processes_equal_the_simulation():
    """Through launch() and the library API; the other process tests go through the command line."""
    results = launch(3, "test_distributed_ring:ring_process", [ROUNDS], timeout=120,
                     env={"PYTHONPATH": str(Path(__file__).parent)})
    ring = reference()
    check_equal(results, ring, [0, 1, 2])
    # what crossed the network: each process sent its model to its successor once per round
    # (node 2's last one stays home), plus discovery's messages
    assert all(r["sent_bytes"] > 0 and r["received_bytes"] > 0 for r in results)
    assert results[0]["weights"] != results[1]["weights"]  # really different models, not one copied


def test_encrypted_run_with_a_node_failing_at_a_round_start_equals_the_simulation():
    """node:1 exits (status 17, closing nothing) at its turn in round 2: the others agree it is
    dead after the liveness timeout, the ring re-forms, and the run equals failures={1: 2}."""
    with Launch(3, "ring", ARGS + ["--encrypt", "aes-gcm"], per_rank={1: ["--fail-at-round", "2"]}) as run:
        codes = run.wait(timeout=120)
        results = [run.result(0), run.result(2)]
        assert codes == [0, CRASH_EXIT, 0], [run.lines(r, stderr=True)[-5:] for r in range(3)]
    assert all(r["dead"] == {"1": 2} for r in results)
    check_equal(results, reference({1: 2}), [0, 2])


def test_a_process_killed_with_sigkill_makes_the_ring_re_form():
    """A real SIGKILL between node:1's turns (just after its model reached node:2): the ring
    re-forms around it, training finishes, and equals the simulation failing it in that round.
    More data and epochs than elsewhere, so the two turns between node:1's (about 0.4 s measured)
    are long enough to kill it in."""
    with Launch(3, "ring", ARGS + ["--n-samples", "12000", "--rounds", "2", "--local-epochs", "3"]) as run:
        run.wait_for(1, "forwarded node:1->node:2", timeout=90)
        run.kill(1, signal.SIGKILL)
        codes = run.wait(timeout=120)
        assert codes == [0, -signal.SIGKILL, 0], [run.lines(r, stderr=True)[-5:] for r in range(3)]
        results = [run.result(0), run.result(2)]
    assert results[0]["dead"] == results[1]["dead"] == {"1": 2}  # it was killed after its turn in round 1
    assert results[0]["alive"] == [0, 2] and results[0]["failed"] == [1]
    check_equal(results, reference({1: 2}, n_samples=12000, rounds=2, local_epochs=3), [0, 2])


def test_a_peer_dying_inside_its_turn_stops_everyone_with_an_error_naming_it():
    with Launch(3, "ring", ARGS, per_rank={1: ["--fail-at-round", "2", "--fail-in-turn"]}) as run:
        codes = run.wait(timeout=60)  # never a hang: bounded well below the hard timeout
        errors = {r: "\n".join(run.lines(r, stderr=True)) for r in (0, 2)}
    assert codes == [1, CRASH_EXIT, 1]
    for r, text in errors.items():
        assert "ring training stopped" in text, text
        assert "lost the connection to rank 1" in text or "rank 1 did not answer" in text, text
        assert "rank 1 hosts node:1" in text, text


# -- discovery over a real TCPStore, one thread per rank ------------------------------------
class StoreGroup:
    """The part of toolkit.distributed.Group that discovery uses, over a TCPStore client."""

    def __init__(self, port: int, rank: int, world: int, timeout: float = 5.0):
        self.rank, self.world_size, self.timeout = rank, world, timeout
        self.store = dist.TCPStore("127.0.0.1", port, world, False, timeout=datetime.timedelta(seconds=timeout))

    def set(self, key, value):
        self.store.set("kv/" + key, value)

    def get(self, key):
        return self.store.get("kv/" + key).decode()

    def wait_key(self, key, timeout):
        import time
        deadline = time.monotonic() + timeout
        while not self.store.check(["kv/" + key]):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def agree(self, key, proposal):
        return self.store.compare_set("kv/" + key, "", proposal).decode()


def discover_all(nodes, graph, *, timeout=5.0):
    """Each rank r registers nodes[r] from its own thread; returns per rank the Roster or the exception."""
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, len(nodes), True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=timeout))
    _, parts = demo_setup("loan", 3, n_samples=300, seed=0)
    out = [None] * len(nodes)

    def one(rank):
        try:
            out[rank] = discover(StoreGroup(port, rank, len(nodes)), nodes[rank], parts[rank % 3],
                                 topology=graph if rank == 0 else None, timeout=timeout)
        except Exception as e:  # noqa: BLE001
            out[rank] = e

    threads = [threading.Thread(target=one, args=(r,), daemon=True) for r in range(len(nodes)) if nodes[r] is not None]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    assert not any(t.is_alive() for t in threads), "discovery hung"
    del server
    return out


def test_discovery_announces_topology_ranks_and_data_shapes():
    rosters = discover_all([2, 0, 1], topology.ring(3))
    for rank, roster in enumerate(rosters):
        assert not isinstance(roster, Exception), roster
        assert roster.node == [2, 0, 1][rank] and roster.ranks == {2: 0, 0: 1, 1: 2} and roster.initiator == 0
        assert sorted(roster.topology.edges) == [(0, 1), (0, 2), (1, 2)]
        assert roster.hosts() == {"discovery": 0, "node:0": 1, "node:1": 2, "node:2": 0}
    _, parts = demo_setup("loan", 3, n_samples=300, seed=0)
    shadow = shadow_dataset(rosters[0].info[1])
    assert data_info(shadow) == data_info(parts[2]) and not shadow.x_train.any()  # rank 2 (node 1) has parts[2]


@pytest.mark.parametrize("nodes, graph, message", [
    ([0, 1, 2], nx.Graph([(0, 1), (2, 2)]), "self-loop at node 2"),
    ([0, 1, 2, 3], nx.Graph([(0, 1), (2, 3)]), "the topology is disconnected: its 2 components are [0, 1] and [2, 3]"),
    ([0, 1, 7], topology.ring(3), "node:7 (registered by rank 2) is not in the topology"),
    ([0, 1, 1], topology.ring(3), "node:1 registered twice"),
    ([0, 1], topology.ring(3), "node(s) [2] of the topology have no process"),
])
def test_discovery_errors_reach_every_process(nodes, graph, message):
    results = discover_all(nodes, graph)
    assert all(isinstance(r, ValueError) for r in results), results
    assert all(message in str(r) for r in results), [str(r) for r in results]


def test_store_liveness_agrees_alive_dead_and_stops_on_abort():
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, 2, True, wait_for_workers=False)  # noqa: F841  (kept alive)
    a, b = StoreGroup(port, 0, 2), StoreGroup(port, 1, 2)
    roster = lambda node: Roster(node=node, topology=topology.ring(3), initiator=0, ranks={0: 0, 1: 1, 2: 2})  # noqa: E731
    events = []
    mine, theirs = StoreLiveness(a, roster(0), timeout=0.3, on_event=events.append), StoreLiveness(b, roster(1), timeout=0.3)
    assert mine(1, 0) is True and theirs(1, 0) is True  # node 0 said it is alive; rank 1 read it
    assert mine(1, 2) is False and theirs(1, 2) is False and mine.dead == theirs.dead == {2: 1}  # nobody answered
    assert events == ["turn round=1 node:0", "dead round=1 node:2 (rank 2)"]
    assert mine(2, 1) is False  # node 1's process was too slow: rank 0 declared it dead ...
    with pytest.raises(LeftRing, match=r"node:1 \(rank 1\) was declared dead by its peers in round 2"):
        theirs(2, 1)  # ... so when it gets there it learns it and stops
    a.agree(ABORT_KEY, "rank 2 (node:2): ConnectionError: gone")
    with pytest.raises(RuntimeError, match=r"stopped by rank 2 \(node:2\): ConnectionError: gone"):
        theirs(3, 0)


def test_a_peer_that_never_registers_is_named_by_every_process_after_the_timeout():
    results = discover_all([0, 1, None], topology.ring(3), timeout=1.0)
    assert all(isinstance(r, TimeoutError) for r in results[:2]), results
    assert all("rank(s) [2] joined the group but did not register a node" in str(r) for r in results[:2])


def test_liveness_checks_its_arguments_and_the_hook_only_runs_where_consulted():
    with pytest.raises(ValueError, match="liveness timeout"):
        StoreLiveness(None, None, timeout=0)
    with pytest.raises(ValueError, match="fail_at is a round"):
        StoreLiveness(None, None, fail_at=0)
    model, parts = demo_setup("loan", 3, n_samples=300, seed=0)
    from toolkit.decentralized import Gossip
    with pytest.raises(ValueError, match="Gossip does not consult liveness"):
        Gossip(model, parts, topology.ring(3)).fit(1, liveness=lambda r, v: True)
    seen = []
    ring = RingTraining(model, parts, topology.ring(3))
    ring.fit(2, liveness=lambda r, v: seen.append((r, v)) or not (r == 2 and v == 1))
    assert seen == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    twin = RingTraining(demo_setup("loan", 3, n_samples=300, seed=0)[0], parts, topology.ring(3))
    twin.fit(2, failures={1: 2})
    assert torch.equal(ring.node_weights, twin.node_weights) and ring.failed == twin.failed == [1]
    assert ring.history["failed"].tolist() == twin.history["failed"].tolist() == [0, 1]
    def stop(r, v):
        if (r, v) == (3, 2):
            raise RuntimeError("peer gone")
        return True
    saved = ring.node_weights.clone()
    with pytest.raises(RuntimeError, match="peer gone"):
        ring.fit(1, liveness=stop)  # raised in round 3 at node:2's turn: nothing of round 3 is committed
    assert ring.round == 2 and torch.equal(ring.node_weights, saved) and len(ring.history) == 2
    with pytest.raises(ValueError, match="returned 'yes'"):
        RingTraining(model, parts, topology.ring(3)).fit(1, liveness=lambda r, v: "yes")


def test_command_line_refuses_bad_options_with_a_clear_message(capsys):
    from toolkit.distributed.__main__ import _topology, main

    with pytest.raises(SystemExit):
        main(["ring", "--rank", "0", "--world", "3", "--port", "29500", "--fail-in-turn"])
    assert "--fail-in-turn needs --fail-at-round" in capsys.readouterr().err
    assert sorted(_topology("0-1,1-2,2-0", 3).edges) == [(0, 1), (0, 2), (1, 2)]
    assert sorted(_topology("star", 3).edges) == [(0, 1), (0, 2)]
    for spec, message in (("0-x", "an edge list is 'a-b,b-c,...'"), ("torus", "use ring, line, star, complete")):
        with pytest.raises(ValueError, match=message):
            _topology(spec, 3)
    assert main(["ring", "--rank", "0", "--world", "3", "--port", "1", "--topology", "torus"]) == 1
    assert "error: ValueError: --topology 'torus'" in capsys.readouterr().err


def test_one_command_line_runs_both_the_ring_and_split_learning(capsys):
    from toolkit.distributed.__main__ import main

    for command, option in (("ring", "--fail-at-round"), ("split", "--config")):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0 and option in capsys.readouterr().out
    # a split rank whose options are wrong fails with one line naming the problem, status 1
    assert main(["split", "--rank", "3", "--world", "2", "--port", "1"]) == 1
    assert "error: ValueError: --rank must be in [0, 2), got 3" in capsys.readouterr().err
