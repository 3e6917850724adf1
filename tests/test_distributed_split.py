"""Split learning across processes (toolkit.distributed.split): vanilla, U-shaped and the relay of
two clients, each party in its own OS process on 127.0.0.1 (a free port, hard timeouts), started
through the CLI. Per-step losses, the real segments' final weights, byte counts and the hosted
parties' transcript entries equal the in-process SplitNN's for the same seed, with Gaussian noise
on the wire too; the server process holds only placeholders of the client's data, receives no
labels in U-shaped and no client weights in the relay."""
import math
import multiprocessing
import time
import traceback
from pathlib import Path

import pytest
import torch

from toolkit.data import load
from toolkit.distributed.launch import free_port
from toolkit.distributed.split import (build, check_hosts, default_hosts, describe, shadow_dataset, shadow_parties,
                                       share_datasets, weights)
from toolkit.distributed.split_cli import client_data, make_parts, noise
from toolkit.split import SplitConfig

LAUNCH_TIMEOUT = 60.0  # seconds for a whole multi-process run (each process also waits <= 20 s per peer)
ARGS = {"batch-size": 128, "lr": 0.1, "momentum": 0.9, "seed": 0, "epochs": 1}


def run_rank(argv: list[str], error_file: str) -> None:
    """One process: the CLI's ``main`` (what ``python -m toolkit.distributed.split_cli`` runs)."""
    torch.set_num_threads(1)
    try:
        from toolkit.distributed.split_cli import main
        main(argv)
    except BaseException:
        Path(error_file).write_text(traceback.format_exc())
        raise SystemExit(1) from None


@pytest.fixture(scope="module")
def processes():
    """A forkserver that imported torch and the toolkit once: each rank forks a clean copy of it
    (no interpreter start and imports per process, and nothing inherited from pytest's process)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "toolkit.distributed.split_cli", "defenses"])
    return ctx


def run_ranks(ctx, tmp_path, world: int, args: list[str], per_rank: dict[int, list[str]] | None = None, *,
              peer_timeout: float = 20.0) -> list[str | None]:
    """Run ``split --rank R --world N ...`` for every rank, each in its own process; returns each
    rank's error (a traceback; None when it succeeded). An overrun kills every process still running."""
    port, procs = free_port(), []
    base = [a for k, v in ARGS.items() for a in (f"--{k}", str(v))]
    try:
        for rank in range(world):
            argv = ["split", "--rank", str(rank), "--world", str(world), "--addr", "127.0.0.1", "--port", str(port),
                    "--timeout", str(peer_timeout), "--out", str(tmp_path / f"rank{rank}.pt"), *base, *args,
                    *(per_rank or {}).get(rank, [])]
            p = ctx.Process(target=run_rank, args=(argv, str(tmp_path / f"rank{rank}.err")), daemon=True)
            p.start()
            procs.append(p)
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        errors = []
        for rank, p in enumerate(procs):
            err = tmp_path / f"rank{rank}.err"
            assert p.exitcode is not None, f"rank {rank} still running after {LAUNCH_TIMEOUT} s"
            errors.append(None if p.exitcode == 0 else err.read_text() if err.exists() else f"exit {p.exitcode}")
        return errors
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)


def launch(ctx, tmp_path, world: int, args: list[str], per_rank: dict[int, list[str]] | None = None) -> list[dict]:
    """:func:`run_ranks`, every rank succeeding; returns each rank's outcome (``--out``)."""
    errors = run_ranks(ctx, tmp_path, world, args, per_rank)
    for rank, error in enumerate(errors):
        assert error is None, f"rank {rank} failed:\n{error}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


def reference(configuration: str, world: int, *, noise_seed: int | None = None, sigma: float = 0.3,
              evaluate: bool = False, handoff: str = "peer"):
    """The same run in one process (InProcess transport, every party real)."""
    ds = load("digits", seed=ARGS["seed"])
    n_clients = world - 1 if configuration == "relay" else 1
    hosts = default_hosts(configuration, world)
    datasets = {p: client_data(configuration, p, ds, n_clients=n_clients, seed=ARGS["seed"])
                for p in hosts if p.startswith("client")}
    config = SplitConfig(batch_size=ARGS["batch-size"], lr=ARGS["lr"], momentum=ARGS["momentum"], seed=ARGS["seed"])
    transforms = [noise(sigma, noise_seed)] if noise_seed is not None else []
    split = build(configuration, make_parts(configuration, ds.shape, ds.n_classes, seed=ARGS["seed"]), datasets,
                  config=config, transforms=transforms, handoff=handoff)
    history = split.fit(ARGS["epochs"])
    evaluation = split.evaluate() if evaluate else {}
    return split, history, evaluation, ds


def close(a, b) -> None:
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=0, atol=1e-6)


def check_against(outcomes: list[dict], split, history, loss_rank: int) -> None:
    """Losses on the loss party's rank (NaN elsewhere), hosted weights, bytes and ledgers as in-process."""
    ledger = [[r.sender, r.receiver, r.kind, r.transfers, r.bytes] for r in split.wire.ledger().itertuples()]
    for o in outcomes:
        assert o["total_bytes"] == split.wire.total_bytes > 0
        assert o["ledger"] == ledger
        assert len(o["history"]["loss"]) == len(history)
        real = weights(split, o["hosted"])
        assert sorted(o["weights"]) == sorted(o["hosted"])  # no process reports (or keeps) another's weights
        for name, w in o["weights"].items():
            close(w, real[name])
        if o["rank"] == loss_rank:
            close(o["history"]["loss"], history["loss"].tolist())
            close(o["history"]["accuracy"], history["accuracy"].tolist())
        else:
            assert all(math.isnan(v) for v in o["history"]["loss"])


def check_transcript(o: dict, split, party: str) -> None:
    """Every transfer ``party`` sent or received in its own process is the in-process one, exactly."""
    ref = [t for t in split.wire.observed() if party in (t.sender, t.receiver)]
    mine = [t for t in o["transcript"] if party in (t[1], t[2])]
    assert [(t.step, t.sender, t.receiver, t.kind, t.phase) for t in ref] == [tuple(t[:5]) for t in mine]
    for t, m in zip(ref, mine):
        close(m[5], t.tensor)


def test_vanilla_across_two_processes_equals_in_process(processes, tmp_path):
    split, history, evaluation, ds = reference("vanilla", 2, evaluate=True)
    server, client = launch(processes, tmp_path, 2, ["--config", "vanilla", "--evaluate"])
    assert server["hosted"] == ["server"] and client["hosted"] == ["client"]
    check_against([server, client], split, history, loss_rank=0)
    for key, value in evaluation.items():
        close(server["evaluation"][key], value)
        assert math.isnan(client["evaluation"][key])
    check_transcript(server, split, "server")
    check_transcript(client, split, "client")
    # the server process holds zeros in place of the client's inputs; the client holds the real ones
    assert server["held"]["client"] == {"x": 0.0, "x_test": 0.0, "y": 0.0, "y_test": 0.0}
    assert client["held"]["client"]["x"] == pytest.approx(float(ds.x_train.abs().sum()))
    received = {t[3] for t in server["transcript"] if t[2] == "server"}
    assert received == {"activations", "labels"}  # vanilla: the client sends its labels, never its inputs
    for step, sender, receiver, kind, phase, tensor in server["transcript"]:
        assert tensor.shape[1:] != ds.x_train.shape[1:]  # nothing of the inputs' shape reached the server
        if (receiver, kind, phase) == ("server", "activations", "train"):  # the cut layer, not the inputs
            x = ds.x_train[split.batches[step]].flatten(1)
            assert tensor.shape == x.shape and not torch.allclose(tensor, x, atol=0.1)


def test_vanilla_with_noise_the_server_need_not_know_the_clients_generator(processes, tmp_path):
    """Gaussian noise on the activations, seeded 7 by the client; the server process seeds its
    shadow's generator differently and still equals the in-process run (only real draws reach it)."""
    split, history, _, _ = reference("vanilla", 2, noise_seed=7)
    plain, _, _, _ = reference("vanilla", 2)
    assert not torch.equal(weights(split, ["server"])["server"], weights(plain, ["server"])["server"])  # noise acts
    outcomes = launch(processes, tmp_path, 2, ["--config", "vanilla", "--noise", "0.3"],
                      per_rank={0: ["--noise-seed", "99"], 1: ["--noise-seed", "7"]})
    check_against(outcomes, split, history, loss_rank=0)
    check_transcript(outcomes[0], split, "server")


def test_u_shaped_with_noise_keeps_labels_in_the_client_process(processes, tmp_path):
    split, history, _, _ = reference("u-shaped", 2, noise_seed=5)
    server, client = launch(processes, tmp_path, 2, ["--config", "u-shaped", "--noise", "0.3", "--noise-seed", "5"])
    check_against([server, client], split, history, loss_rank=1)  # the client computes the loss
    check_transcript(server, split, "server")
    check_transcript(client, split, "client")
    assert {t[3] for t in server["transcript"]} == {"activations", "gradients"}  # no labels ever cross
    assert {t[3] for t in server["transcript"] if t[2] == "server"} == {"activations", "gradients"}
    assert all(v == 0.0 for v in server["held"]["client"].values())
    assert len(client["weights"]["client"]) == sum(p.numel() for m in split.parties[0].modules
                                                   for p in m.parameters())  # head and tail


def test_relay_of_two_clients_and_a_server_in_three_encrypted_processes(processes, tmp_path):
    split, history, _, ds = reference("relay", 3, noise_seed=11)
    outcomes = launch(processes, tmp_path, 3, ["--config", "relay", "--noise", "0.3", "--noise-seed", "11",
                                               "--encrypt", "aes-gcm"])
    assert [o["hosted"] for o in outcomes] == [["server"], ["client:0"], ["client:1"]]
    check_against(outcomes, split, history, loss_rank=0)
    for o, party in zip(outcomes, ["server", "client:0", "client:1"]):
        check_transcript(o, split, party)
    server = outcomes[0]
    # the weights go client:0 -> client:1 directly: the server process never receives them
    assert {t[3] for t in server["transcript"] if t[2] == "server"} == {"activations", "labels"}
    assert any(t[3] == "weights" and t[1] == "client:0" for t in outcomes[2]["transcript"])
    for o, party in zip(outcomes, ["server", "client:0", "client:1"]):
        assert o["held"]["server"] == {}  # the server holds no data of its own
        for name, held in o["held"].items():
            if name != "server":
                assert (name == party) == (held["x"] > 0 and held["y"] > 0), (o["rank"], name)  # only its own


def test_a_server_whose_model_does_not_fit_the_clients_activations_fails_naming_them(processes, tmp_path):
    errors = run_ranks(processes, tmp_path, 2, ["--config", "vanilla"], per_rank={0: ["--hidden", "48,32"]},
                       peer_timeout=5.0)
    assert errors[0] is not None and "ValueError" in errors[0]
    assert "'activations' from 'client' (rank 1) to 'server' (rank 0)" in errors[0] and "(128, 48)" in errors[0]
    assert errors[1] is not None  # the client does not hang: its peer is gone (an error, or a timeout)


# -- in one process: hosts, descriptions, shadows ------------------------------------------------
class StoreOnly:
    """The store side of a Group, in memory (share_datasets uses set / get / wait_key)."""

    def __init__(self, rank, world_size=2, values=None):
        self.rank, self.world_size, self.timeout, self.values = rank, world_size, 0.2, dict(values or {})

    def set(self, key, value):
        self.values[key] = value

    def get(self, key):
        return self.values[key]

    def wait_key(self, key, timeout):
        return key in self.values


def test_hosts_are_checked_with_errors_naming_the_problem():
    assert default_hosts("relay", 4) == {"server": 0, "client:0": 1, "client:1": 2, "client:2": 3}
    with pytest.raises(ValueError, match="world_size 2"):
        default_hosts("vanilla", 3)
    with pytest.raises(ValueError, match="unknown split configuration 'y-shaped'"):
        default_hosts("y-shaped", 2)
    with pytest.raises(ValueError, match=r"missing \['server'\]"):
        check_hosts("vanilla", {"client": 0}, 2)
    with pytest.raises(ValueError, match=r"rank\(s\) \[2\] host no party"):
        check_hosts("vanilla", {"client": 0, "server": 1}, 3)
    with pytest.raises(ValueError, match=r"hosts\['server'\] must be a rank in \[0, 2\)"):
        check_hosts("vanilla", {"client": 0, "server": 5}, 2)


def test_shadows_hold_zeros_of_the_described_shapes_and_never_foreign_data():
    ds = load("digits")
    shadow = shadow_dataset(describe(ds))
    assert shadow.x_train.shape == ds.x_train.shape and shadow.n_classes == ds.n_classes
    assert not shadow.x_train.any() and not shadow.y_test.any()
    with pytest.raises(ValueError, match="x_train must be a shape"):
        shadow_dataset({**describe(ds), "x_train": [-1, 64]})
    server = StoreOnly(rank=0)
    with pytest.raises(ValueError, match=r"rank 0 was given data for \['client'\], which it does not host"):
        share_datasets(server, {"server": 0, "client": 1}, {"client": ds}, ["client"])
    with pytest.raises(TimeoutError, match=r"client \(rank 1\) published no data description"):
        share_datasets(server, {"server": 0, "client": 1}, {}, ["client"])
    client = StoreOnly(rank=1)
    assert share_datasets(client, {"server": 0, "client": 1}, {"client": ds}, ["client"])["client"] is ds
    got = share_datasets(StoreOnly(0, values=client.values), {"server": 0, "client": 1}, {}, ["client"])
    assert got["client"].x_test.shape == ds.x_test.shape and not got["client"].x_test.any()
    # a built split's shadow parties hold zero weights and zero data; hosted ones keep theirs
    sl = build("vanilla", make_parts("vanilla", ds.shape, ds.n_classes), {"client": ds}, hosted=["server"])
    assert sl.parties[0].name == "client" and not weights(sl, ["client"])["client"].any()
    assert weights(sl, ["server"])["server"].abs().sum() > 0 and not sl.parties[0].data["x"].any()
    with pytest.raises(ValueError, match=r"parties \['hub'\] that are not in this split"):
        shadow_parties(sl, ["hub"])
