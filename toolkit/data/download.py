"""Download the official dataset files into a cache folder, checking each file's SHA-256.

``DOWNLOADS`` lists, per dataset, the files to fetch: name, size, SHA-256 and mirror URLs, tried in
order. A file is streamed to a temporary ``.part`` file in the cache folder, hashed on the way, and
renamed into place only when its size and digest match; a mismatch, an HTTP error or an
interruption removes the temporary file, so a file under its real name in the cache has been
verified (or was put there by the user). A file already in the folder is never downloaded again.

Default folder: ``default_root()``, i.e. ``$LEAKLAB_DATA`` if set, else ``~/.cache/leaklab``, with
one subfolder per dataset (``mnist``, ``fashion_mnist``, ``cifar10``).

Example:
    >>> default_root() / "mnist"  # doctest: +SKIP
    PosixPath('/home/me/.cache/leaklab/mnist')
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from toolkit import validate
from toolkit.progress import progress

CHUNK = 1 << 20  # bytes read and hashed at a time


class ChecksumError(ValueError):
    """A downloaded file's size or SHA-256 is not the expected one; the file was not kept."""


class DownloadError(OSError):
    """No mirror delivered a file; the message lists each URL and what went wrong."""


@dataclass(frozen=True)
class Remote:
    """One file to download: its name in the cache folder, size in bytes, SHA-256, and mirror URLs."""

    filename: str
    size: int
    sha256: str
    urls: tuple[str, ...]
    extract: str | None = None  # a .tar.gz: the folder it unpacks to (extracted once, beside it)


def _files(bases: tuple[str, ...], table: tuple[tuple[str, int, str], ...]) -> tuple[Remote, ...]:
    return tuple(Remote(name, size, sha, tuple(base + name for base in bases)) for name, size, sha in table)


# MNIST. Mirrors: torchvision's (torchvision/datasets/mnist.py, MNIST.mirrors), TensorFlow Datasets'
# (tensorflow_datasets/url_checksums/mnist.txt), and Y. LeCun's original site, often unavailable.
# Sizes and SHA-256: tensorflow_datasets/url_checksums/mnist.txt; the same four digests are in
# torchvision/prototype/datasets/_builtin/mnist.py (MNIST._CHECKSUMS). ../shared/data/mnist's t10k pair
# decompresses to the published IDX digests (images 0fa7898d..., labels ff7bcfd4...); its .gz files
# are a re-compressed copy (gzip header dated 2021) whose own digests differ from the ones below.
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/",
                 "http://yann.lecun.com/exdb/mnist/")
# Fashion-MNIST (Xiao et al. 2017). Mirrors: the official site named in the README of
# github.com/zalandoresearch/fashion-mnist ("Get the Data"; also torchvision's FashionMNIST.mirrors and
# TensorFlow Datasets'), and that repository's data/fashion folder. Sizes and SHA-256:
# tensorflow_datasets/url_checksums/fashion_mnist.txt; the same digests are in
# torchvision/prototype/datasets/_builtin/mnist.py (FashionMNIST._CHECKSUMS).
FASHION_MNIST_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                         "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/")
# CIFAR-10 (Krizhevsky 2009), binary version (fixed-size records, no pickle), from the author's page
# https://www.cs.toronto.edu/~kriz/cifar.html. Size and SHA-256: tensorflow_datasets/url_checksums/cifar10.txt;
# the same digest is in JuliaML/MLDatasets.jl (src/CIFAR10/CIFAR10.jl) and ankane/torchvision-ruby
# (lib/torchvision/datasets/cifar10.rb, CIFAR10::SHA256).
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"

DOWNLOADS: dict[str, tuple[Remote, ...]] = {
    "mnist": _files(MNIST_MIRRORS, (  # train first: an interrupted download never leaves a test-only folder
        ("train-images-idx3-ubyte.gz", 9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        ("train-labels-idx1-ubyte.gz", 28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        ("t10k-images-idx3-ubyte.gz", 1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        ("t10k-labels-idx1-ubyte.gz", 4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    )),
    "fashion_mnist": _files(FASHION_MNIST_MIRRORS, (
        ("train-images-idx3-ubyte.gz", 26421880, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        ("train-labels-idx1-ubyte.gz", 29515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        ("t10k-images-idx3-ubyte.gz", 4422102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        ("t10k-labels-idx1-ubyte.gz", 5148, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    )),
    "cifar10": (Remote("cifar-10-binary.tar.gz", 170052171,
                       "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd", (CIFAR10_URL,),
                       extract="cifar-10-batches-bin"),),
}


def default_root() -> Path:
    """The folder datasets are cached in when ``load`` gets no ``root``: ``$LEAKLAB_DATA`` if set,
    else ``~/.cache/leaklab``. Each dataset has its own subfolder, e.g. ``default_root() / "mnist"``."""
    env = os.environ.get("LEAKLAB_DATA", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "leaklab"


def fetch(name: str, folder: str | Path, *, timeout: float = 60.0, show_progress: bool = False) -> list[Path]:
    """Download the files of dataset ``name`` (a key of ``DOWNLOADS``) that ``folder`` lacks, and
    unpack an archive whose folder is not there yet.

    Args:
        name: mnist, fashion_mnist or cifar10.
        folder: the cache folder for this dataset (created if needed).
        timeout: seconds a mirror may stay silent before the next one is tried.
        show_progress: a progress bar per file.

    Returns:
        The paths of the dataset's files in ``folder``.

    Raises:
        ChecksumError: a mirror delivered a file with the wrong size or digest (and no other mirror
            delivered the right one).
        DownloadError: every mirror failed (HTTP error, no connection, interrupted transfer).
    """
    if name not in DOWNLOADS:
        raise ValueError(f"no download for dataset {name!r}; downloadable: {', '.join(DOWNLOADS)}")
    timeout = validate.positive("timeout", timeout)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for remote in DOWNLOADS[name]:
        path = folder / remote.filename
        if not path.is_file():
            _download(remote, path, timeout, show_progress)
        if remote.extract and not (folder / remote.extract).is_dir():
            _extract(path, folder)
        paths.append(path)
    return paths


def _download(remote: Remote, path: Path, timeout: float, show_progress: bool) -> None:
    """Try each mirror in turn until one delivers the file with the right size and digest."""
    failures, mismatches = [], []
    for url in remote.urls:
        fd, part = tempfile.mkstemp(dir=path.parent, prefix=f".{remote.filename}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                size, digest = _stream(url, out, remote, timeout, show_progress)
            if size != remote.size or digest != remote.sha256:
                mismatches.append(f"{url}: expected {remote.size} bytes with SHA-256 {remote.sha256}, "
                                  f"got {size} bytes with SHA-256 {digest}")
                continue
            os.replace(part, path)  # atomic: the real name only ever holds a verified file
            return
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:  # HTTPError is a URLError
            failures.append(f"{url}: {type(err).__name__}: {getattr(err, 'reason', None) or err}")
        finally:
            if os.path.exists(part):
                os.remove(part)  # mismatch, failure or interruption (KeyboardInterrupt too): nothing kept
    tried = "; ".join(mismatches + failures)
    if mismatches:
        raise ChecksumError(f"{remote.filename}: checksum mismatch, the file was not kept in {path.parent} ({tried})")
    raise DownloadError(f"could not download {remote.filename} into {path.parent} ({tried}); "
                        f"put the file there yourself to use it")


def _stream(url: str, out, remote: Remote, timeout: float, show_progress: bool) -> tuple[int, str]:
    """Copy ``url`` into ``out`` chunk by chunk; returns (bytes, SHA-256). Stops one chunk past the
    expected size so a wrong file cannot fill the disk."""
    sha, size = hashlib.sha256(), 0
    request = urllib.request.Request(url, headers={"User-Agent": "leaklab"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        chunks = iter(lambda: response.read(CHUNK), b"")
        for chunk in progress(chunks, show=show_progress, desc=remote.filename, total=-(-remote.size // CHUNK)):
            sha.update(chunk)
            out.write(chunk)
            size += len(chunk)
            if size > remote.size:
                break
        else:
            if getattr(response, "length", None):  # the server announced more than it sent
                raise http.client.IncompleteRead(b"", response.length)
    return size, sha.hexdigest()


def _extract(archive: Path, folder: Path) -> None:
    """Unpack a .tar.gz into ``folder``: regular files and directories only, no absolute paths, no
    ``..``; unpacked into a temporary folder first, then each top-level entry renamed into place."""
    try:
        tar = tarfile.open(archive, "r:gz")
        listed = tar.getmembers()
    except (tarfile.TarError, EOFError, zlib.error) as err:
        raise ValueError(f"{archive}: not a readable .tar.gz ({type(err).__name__}: {err}); delete it to download "
                         "it again") from None
    with tar:
        members = [m for m in listed if not (m.isdir() and PurePosixPath(m.name).parts == ())]  # a "./" entry
        for m in members:
            parts = PurePosixPath(m.name).parts
            if m.name.startswith(("/", "\\")) or ".." in parts or "\\" in m.name or not parts:
                raise ValueError(f"{archive}: refusing archive member {m.name!r}: absolute path or '..'")
            if not (m.isreg() or m.isdir()):
                raise ValueError(f"{archive}: refusing archive member {m.name!r}: not a regular file or folder")
        tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".extract-"))
        try:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: the stdlib's own safety filter too
                tar.extractall(tmp, members=members, filter="data")
            else:
                tar.extractall(tmp, members=members)
            for entry in tmp.iterdir():
                if not (folder / entry.name).exists():
                    os.replace(entry, folder / entry.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
