"""The downloader, tested against a local HTTP server on 127.0.0.1 serving small files these tests write
(writers shared with test_data_files.py)."""
from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import re
import struct
import tarfile
import sys
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from toolkit.data import (DOWNLOADS, IDX_IMAGES, IDX_LABELS, ChecksumError,
                          DatasetNotFoundError, DownloadError, Remote, default_root, download, load)

from test_data_files import write_cifar_bin  # noqa: E402  (tests/ is on sys.path)


@pytest.fixture
def server():
    """An HTTP server on 127.0.0.1 (a free port) serving ``files`` {path: bytes}; ``truncate`` paths
    announce their full length but send half; ``hits`` counts requests per path."""
    files, truncate, hits = {}, set(), Counter()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits[self.path] += 1
            if self.path not in files:
                self.send_error(404)
                return
            body = files[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if self.path in truncate else body)

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):  # a client hanging up mid-file is the test's point
            if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
                super().handle_error(request, client_address)

    httpd = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_port}", files=files, truncate=truncate, hits=hits)
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def idx_blobs(n: int = 20) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """The four MNIST files, gzip-compressed, and the arrays in them (keyed like the files)."""
    rng = np.random.default_rng(0)
    arrays = {f"{p}-{k}-ubyte.gz": a for p in ("train", "t10k")
              for k, a in (("images-idx3", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                           ("labels-idx1", (np.arange(n) % 10).astype(np.uint8)))}
    blobs = {f: gzip.compress(struct.pack(">I", IDX_IMAGES if a.ndim == 3 else IDX_LABELS)
                              + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes(), mtime=0) for f, a in arrays.items()}
    return blobs, arrays


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """The default folder, pointed at a fresh temporary one through $LEAKLAB_DATA."""
    monkeypatch.setenv("LEAKLAB_DATA", str(tmp_path / "cache"))
    return tmp_path / "cache"


def serve(server, monkeypatch, name: str, blobs: dict[str, bytes], *, mirrors=("a",), served="a", expected=None,
          **remote) -> None:
    """Serve ``blobs`` under /<served>/ and point DOWNLOADS[name] at /<mirror>/<file> for each mirror in
    order, with the sizes and digests of ``expected`` (default: the blobs served)."""
    server.files.update({f"/{served}/{f}": b for f, b in blobs.items()})
    monkeypatch.setitem(DOWNLOADS, name, tuple(
        Remote(f, len(b), hashlib.sha256(b).hexdigest(), tuple(f"{server.url}/{m}/{f}" for m in mirrors), **remote)
        for f, b in (expected or blobs).items()))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part") or p.name.startswith("."))


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_download_checks_caches_and_loads(server, cache, monkeypatch, name):
    blobs, arrays = idx_blobs()
    serve(server, monkeypatch, name, blobs)
    ds = load(name, download=True)
    assert torch.equal(ds.x_train[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte.gz"]).float() / 255)
    assert torch.equal(ds.y_test, torch.from_numpy(arrays["t10k-labels-idx1-ubyte.gz"]).long())
    assert sorted(p.name for p in (cache / name).iterdir()) == sorted(blobs)  # default_root()/name, nothing else
    assert len(server.hits) == 4 and set(server.hits.values()) == {1}
    again = load(name, download=True)  # cached: not downloaded again
    assert torch.equal(again.x_train, ds.x_train) and sum(server.hits.values()) == 4


def test_a_404_on_the_first_mirror_falls_through_to_the_second(server, cache, monkeypatch):
    blobs, _ = idx_blobs()
    serve(server, monkeypatch, "mnist", blobs, mirrors=("dead", "ok"), served="ok")
    assert len(load("mnist", download=True).y_train) == 20
    assert all(server.hits[f"/dead/{f}"] == 1 and server.hits[f"/ok/{f}"] == 1 for f in blobs)


def test_a_checksum_mismatch_names_the_file_and_digests_and_keeps_nothing(server, cache, monkeypatch):
    good, _ = idx_blobs()
    name = "t10k-labels-idx1-ubyte.gz"
    bad = {**good, name: good[name][:-1] + bytes([good[name][-1] ^ 1])}  # same size, one bit flipped
    serve(server, monkeypatch, "mnist", bad, expected=good)
    expected, got = hashlib.sha256(good[name]).hexdigest(), hashlib.sha256(bad[name]).hexdigest()
    with pytest.raises(ChecksumError, match=f"{name}: checksum mismatch.*expected .*{expected}, got .*{got}"):
        load("mnist", download=True)
    assert not (cache / "mnist" / name).exists() and leftovers(cache / "mnist") == []
    with pytest.raises(DatasetNotFoundError, match="missing: t10k-labels-idx1-ubyte;"):
        load("mnist")  # the three files that verified are kept; the bad one is not there
    server.files[f"/a/{name}"] = good[name] + bytes(5 * download.CHUNK)
    with pytest.raises(ChecksumError, match=f"expected {len(good[name])} bytes") as err:
        load("mnist", download=True)  # a file larger than expected is cut off within one chunk past its size
    got = int(re.search(r"got (\d+) bytes", str(err.value)).group(1))
    assert len(good[name]) < got <= len(good[name]) + download.CHUNK
    assert leftovers(cache / "mnist") == []


def test_a_failed_or_interrupted_download_leaves_no_partial_file(server, cache, monkeypatch):
    blobs, _ = idx_blobs()
    serve(server, monkeypatch, "mnist", blobs)
    server.truncate.add("/a/train-images-idx3-ubyte.gz")  # the connection closes halfway through
    with pytest.raises(DownloadError, match=r"train-images-idx3-ubyte.gz.*127\.0\.0\.1.*IncompleteRead"):
        load("mnist", download=True)
    assert list((cache / "mnist").iterdir()) == []

    class Interrupted:  # a response interrupted (Ctrl-C) after its first chunk
        def __init__(self, *args, **kwargs):
            self.reads = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, n):
            self.reads += 1
            if self.reads > 1:
                raise KeyboardInterrupt
            return bytes(10)

    monkeypatch.setattr("urllib.request.urlopen", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        load("mnist", download=True)
    assert list((cache / "mnist").iterdir()) == []


def test_without_download_a_missing_folder_gives_the_clear_error(server, cache, monkeypatch):
    serve(server, monkeypatch, "mnist", idx_blobs()[0])
    with pytest.raises(DatasetNotFoundError, match=r"cache/mnist.*missing: .*t10k-labels-idx1-ubyte.*download=True"):
        load("mnist")
    with pytest.raises(FileNotFoundError):
        load("cifar10", root=cache / "nothing")
    assert sum(server.hits.values()) == 0  # no download without download=True


def cifar_archive(tmp_path: Path, members=None) -> tuple[bytes, list[np.ndarray]]:
    """cifar-10-binary.tar.gz: the binary batches under cifar-10-batches-bin/, plus ``members`` {TarInfo: bytes}."""
    batches = write_cifar_bin(tmp_path / "src" / "cifar-10-batches-bin", n=3, classes=[f"k{i}" for i in range(10)])
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
        for info, data in (members or {}).items():
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue(), batches


def test_cifar10_download_unpacks_the_binary_version(server, cache, monkeypatch, tmp_path):
    blob, batches = cifar_archive(tmp_path)
    serve(server, monkeypatch, "cifar10", {"cifar-10-binary.tar.gz": blob}, extract="cifar-10-batches-bin")
    ds = load("cifar10", download=True)
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.classes[0] == "k0"
    assert torch.equal(ds.y_test, torch.from_numpy(batches[5][:, 0]).long())
    assert sorted(p.name for p in (cache / "cifar10").iterdir()) == ["cifar-10-batches-bin", "cifar-10-binary.tar.gz"]
    load("cifar10", download=True)
    assert sum(server.hits.values()) == 1


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, 4 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize("member, reason", [
    (tar_member("../escaped"), "absolute path or '..'"),
    (tar_member("/tmp/escaped-absolute"), "absolute path or '..'"),
    (tar_member("cifar-10-batches-bin/link", tarfile.SYMTYPE, "/etc/passwd"), "not a regular file"),
    (tar_member("cifar-10-batches-bin/hard", tarfile.LNKTYPE, "cifar-10-batches-bin/readme"), "not a regular file"),
])
def test_unsafe_archive_members_are_refused(server, cache, monkeypatch, tmp_path, member, reason):
    blob, _ = cifar_archive(tmp_path, {member: b"evil"})
    serve(server, monkeypatch, "cifar10", {"cifar-10-binary.tar.gz": blob}, extract="cifar-10-batches-bin")
    with pytest.raises(ValueError, match=f"refusing archive member '{member.name}': {reason}"):
        load("cifar10", download=True)
    assert not (cache / "escaped").exists() and not Path("/tmp/escaped-absolute").exists()
    assert sorted(p.name for p in (cache / "cifar10").iterdir()) == ["cifar-10-binary.tar.gz"]  # nothing unpacked


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("LEAKLAB_DATA", str(tmp_path / "data"))
    assert default_root() == tmp_path / "data"
    monkeypatch.delenv("LEAKLAB_DATA")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_root() == tmp_path / ".cache" / "leaklab"


def test_a_corrupt_archive_in_the_cache_is_named(server, cache, monkeypatch, tmp_path):
    blob, _ = cifar_archive(tmp_path)
    serve(server, monkeypatch, "cifar10", {"cifar-10-binary.tar.gz": blob}, extract="cifar-10-batches-bin")
    (cache / "cifar10").mkdir(parents=True)
    (cache / "cifar10" / "cifar-10-binary.tar.gz").write_bytes(blob[: len(blob) // 2])  # put there by hand, cut short
    with pytest.raises(ValueError, match=r"cifar-10-binary.tar.gz: not a readable .tar.gz.*delete it"):
        load("cifar10", download=True)
    assert sum(server.hits.values()) == 0  # a file in the cache is used as it is, never downloaded again
