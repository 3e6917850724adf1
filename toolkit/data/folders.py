"""Parsers for datasets kept in a folder: MNIST and Fashion-MNIST (IDX files), CIFAR-10 (binary
version, or the python version's pickles through a restricted unpickler).

Nothing here downloads anything (``toolkit.data.download`` does). Each reader returns NumPy arrays
(uint8 pixels, int64 labels); missing files raise ``DatasetNotFoundError`` (a ``FileNotFoundError``
and a ``ValueError``) naming them and how to get them; a truncated or malformed file raises
``ValueError`` naming the file.
"""
from __future__ import annotations

import gzip
import math
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np

# IDX type codes (third magic byte) -> big-endian NumPy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_IMAGES, IDX_LABELS = 2051, 2049  # magic numbers of MNIST image (uint8, 3-D) and label (uint8, 1-D) files

class DatasetNotFoundError(FileNotFoundError, ValueError):
    """A dataset's files are not in the folder; the message names the missing files and how to get them."""


MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_DATASETS = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}  # same four file names, same format
CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")  # python version (pickles)
CIFAR10_BIN_FILES = tuple(f"{name}.bin" for name in CIFAR10_FILES)     # binary version
CIFAR10_RECORD = 1 + 3 * 32 * 32  # binary record: one label byte, then the R, G and B planes (32x32 each)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def read_idx(path: str | Path, *, magic: int | None = None) -> np.ndarray:
    """Read one IDX file (raw or gzip-compressed, detected from its first bytes).

    Args:
        path: the file.
        magic: if given, the magic number the file must carry (``IDX_IMAGES`` = 2051, ``IDX_LABELS`` = 2049).

    Returns:
        An array with the file's dimensions, in native byte order (uint8 for MNIST).

    Example:
        >>> labels = read_idx("mnist/t10k-labels-idx1-ubyte.gz", magic=IDX_LABELS)  # doctest: +SKIP
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path}: corrupt gzip data ({err})") from None
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(raw)} bytes)")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    found = struct.unpack(">I", raw[:4])[0]
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number {found:#010x})")
    if magic is not None and found != magic:
        raise ValueError(f"{path}: expected IDX magic number {magic}, found {found}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise ValueError(f"{path}: IDX file {what}: dims {dims} need {expected} bytes, file has {len(raw)}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))  # native byte order, writable copy


def _find(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def idx_files_present(root: str | Path) -> bool:
    """Whether ``root`` holds at least MNIST's t10k pair (raw or ``.gz``), checked without reading it."""
    return all(_find(Path(root), name) is not None for name in MNIST_FILES["test"])


def read_mnist(root: str | Path | None, *, dataset: str = "mnist") -> dict[str, tuple[np.ndarray, np.ndarray] | None]:
    """Read MNIST or Fashion-MNIST from a folder holding the four IDX files (each raw or ``.gz``).

    The t10k pair alone is enough: then ``"train"`` is ``None`` and the caller splits the test set.

    Args:
        root: the folder.
        dataset: ``"mnist"`` or ``"fashion_mnist"`` (same file names and format; names the error).

    Returns:
        ``{"train": (images, labels) | None, "test": (images, labels)}``; images ``(N, H, W)`` uint8,
        labels ``(N,)`` int64.

    Example:
        >>> read_mnist("data/mnist")["test"][1][:3]  # doctest: +SKIP
        array([7, 2, 1])
    """
    if dataset not in IDX_DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(IDX_DATASETS)}, got {dataset!r}")
    title = IDX_DATASETS[dataset]
    all_names = [n for pair in MNIST_FILES.values() for n in pair]
    expected = ", ".join(all_names) + " (each raw or .gz; the t10k pair alone is enough)"
    if root is None:
        raise ValueError(f"{title} needs root=<folder holding {expected}>")
    root = Path(root)
    found = {name: _find(root, name) for name in all_names}
    train_found = [found[n] is not None for n in MNIST_FILES["train"]]
    test_found = [found[n] is not None for n in MNIST_FILES["test"]]
    if not all(test_found) or (any(train_found) and not all(train_found)):
        missing = ", ".join(n for n, p in found.items() if p is None)
        raise DatasetNotFoundError(f"{title} files not found in {root}: expected {expected}; missing: {missing}; "
                                   f"load({dataset!r}, download=True) downloads them")

    out: dict[str, tuple[np.ndarray, np.ndarray] | None] = {"train": None}
    for split, (img_name, lbl_name) in MNIST_FILES.items():
        if found[img_name] is None:
            continue
        images = read_idx(found[img_name], magic=IDX_IMAGES)
        labels = read_idx(found[lbl_name], magic=IDX_LABELS)
        if len(images) != len(labels):
            raise ValueError(f"{found[img_name]} has {len(images)} images but {found[lbl_name]} "
                             f"has {len(labels)} labels")
        out[split] = (images, labels.astype(np.int64))
    return out


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds NumPy arrays and plain containers, and refuses any other global.

    The globals it allows only build data: ``numpy.ndarray``, ``numpy.dtype``, NumPy's
    ``_reconstruct``/``scalar``/``_frombuffer`` and ``_codecs.encode`` (bytes in protocol-2 pickles).
    Every other way a pickle names a callable (GLOBAL, STACK_GLOBAL, INST, OBJ, the EXT registry)
    goes through ``find_class``, and persistent ids are refused by ``pickle``'s default, so a
    batch file cannot run code. The binary version needs no unpickler at all.
    """

    _SAFE = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
    _SAFE_CORE = {("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")}

    def find_class(self, module: str, name: str):  # noqa: ANN201
        head, _, tail = module.rpartition(".")
        if head in ("numpy.core", "numpy._core") and (tail, name) in self._SAFE_CORE:
            if head == "numpy.core" and hasattr(np, "_core"):
                module = f"numpy._core.{tail}"  # pickles from NumPy 1.x, read by NumPy 2.x
            return super().find_class(module, name)
        if (module, name) in self._SAFE:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as err:  # any malformed pickle: EOFError, UnpicklingError, ValueError, ...
        raise ValueError(f"{path}: not a readable CIFAR-10 pickle ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _check_labels(path: Path, labels: np.ndarray, n_classes: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"{path}: labels must lie in [0, {n_classes}), found {labels.min()}..{labels.max()}")


def _read_batch(path: Path, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One python-version batch (a pickled dict with b'data' (n, 3072) uint8 and b'labels')."""
    batch = _unpickle(path)
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path}: CIFAR-10 batch needs keys b'data' and b'labels', found {sorted(batch)}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be (n, 3072) uint8, found {data.shape} {data.dtype}")
    if labels.shape != (len(data),):
        raise ValueError(f"{path}: {len(data)} images but {labels.size} labels")
    _check_labels(path, labels, n_classes)
    return data.reshape(-1, 3, 32, 32), labels  # row = R plane, G plane, B plane, each 32x32 row-major


def _read_bin(path: Path, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One binary-version batch: fixed-size records, a label byte then 3072 pixel bytes."""
    raw = path.read_bytes()
    if not raw or len(raw) % CIFAR10_RECORD:
        raise ValueError(f"{path}: not a CIFAR-10 binary batch: {len(raw)} bytes is not a positive multiple "
                         f"of the {CIFAR10_RECORD}-byte record (1 label byte + 3072 pixel bytes)")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR10_RECORD)
    labels = records[:, 0].astype(np.int64)
    _check_labels(path, labels, n_classes)
    return records[:, 1:].reshape(-1, 3, 32, 32).copy(), labels


def _layout(root: Path, subfolder: str, names: tuple[str, ...]) -> tuple[Path, list[str]]:
    """The folder holding ``names`` (``root/subfolder`` if it exists, else ``root``) and those missing."""
    folder = root / subfolder if (root / subfolder).is_dir() else root
    return folder, [name for name in names if not (folder / name).is_file()]


def read_cifar10(root: str | Path | None) -> dict:
    """Read CIFAR-10 from the binary version (``data_batch_1.bin``..``5``, ``test_batch.bin``) or the
    python version (``data_batch_1``..``5``, ``test_batch``); the binary version wins when both are there.

    ``root`` may hold the batches or a ``cifar-10-batches-bin`` / ``cifar-10-batches-py`` subfolder
    with them. The binary version is read as fixed-size records; of the python pickles only NumPy
    arrays and plain containers are rebuilt, and any other object in a file is refused.

    Args:
        root: the folder.

    Returns:
        ``{"train": (images, labels), "test": (images, labels), "classes": [10 names]}``; images
        ``(N, 3, 32, 32)`` uint8, labels ``(N,)`` int64. Class names come from ``batches.meta.txt``
        (binary) or ``batches.meta`` (python) if present.

    Example:
        >>> x, y = read_cifar10("data/cifar10")["train"]  # doctest: +SKIP
    """
    expected = (f"the binary version ({', '.join(CIFAR10_BIN_FILES)}, optionally inside cifar-10-batches-bin/) "
                f"or the python version ({', '.join(CIFAR10_FILES)}, optionally inside cifar-10-batches-py/, "
                "plus batches.meta)")
    if root is None:
        raise ValueError(f"CIFAR-10 needs root=<folder holding {expected}>")
    root = Path(root)
    binary = _layout(root, "cifar-10-batches-bin", CIFAR10_BIN_FILES)
    python = _layout(root, "cifar-10-batches-py", CIFAR10_FILES)
    if binary[1] and python[1]:
        missing = python[1] if len(python[1]) < len(binary[1]) else binary[1]  # the version nearer complete
        raise DatasetNotFoundError(f"CIFAR-10 files not found in {root}: expected {expected}; missing: "
                                   f"{', '.join(missing)}; load('cifar10', download=True) downloads the binary version")

    classes = list(CIFAR10_CLASSES)
    if not binary[1]:
        folder, names, read = binary[0], CIFAR10_BIN_FILES, _read_bin
        if (folder / "batches.meta.txt").is_file():
            listed = [line.strip() for line in (folder / "batches.meta.txt").read_text(errors="replace").splitlines()]
            classes = [name for name in listed if name] or classes
    else:
        folder, names, read = python[0], CIFAR10_FILES, _read_batch
        if (folder / "batches.meta").is_file():
            meta = _unpickle(folder / "batches.meta")
            if "label_names" in meta:
                classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta["label_names"]]
    batches = [read(folder / name, len(classes)) for name in names]
    train = batches[:5]
    return {
        "train": (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
        "test": batches[5],
        "classes": classes,
    }
