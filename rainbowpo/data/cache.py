"""Tokenize once: local rank 0 of each node builds the token arrays, the other local ranks wait and
memory-map them, and a later run with the same key reads them without tokenizing.

    <data.cache_dir>/<key>/ids.npy       int32, every token of every kept row, end to end
                          /offsets.npy   int64 [rows·k + 1]: segment j of row i is ids[o[i·k+j] : o[i·k+j+1]]
                          /summary.json  the start-up summary's counters (rows read, truncated, dropped, ...)
                          /meta.json     CACHE_VERSION, key, rows, k

k = 3 for preference pairs (prompt, chosen, rejected), 2 for SFT (prompt, completion). The key hashes
what the ids depend on: the sources' bytes (sha256), the tokenizer (its saved files: vocab, merges,
special tokens, chat template), the data settings, the tokenization code and CACHE_VERSION — not the
path of a file, nor settings that only batch the ids (packing). A folder is written under a temporary
name and renamed when complete, so a crash never leaves a half-written cache under a real key. The
waiting ranks poll for the folder; when rank 0 fails it leaves `<key>.error` with its message, so they
stop at once with the same error instead of waiting out the timeout (REFERENCES.md "Tokenize once").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np

CACHE_VERSION = 1
WAIT_TIMEOUT_S = 4 * 3600.0  # default of RAINBOWPO_DATA_WAIT_S; a few million rows take well under this
POLL_S = 0.2
CODE_FILES = (
    "data/cache.py",
    "data/formats.py",
    "data/render.py",
    "data/sources.py",
    "data/tokenize.py",
    "config.py",
)  # fmt: skip  (under rainbowpo/; config.py: where derived data defaults live)
NOT_IN_KEY = ("train", "eval", "num_proc", "cache_dir", "packing", "share_prompt")  # DataConfig fields


class CacheError(ValueError):
    """An unreadable cache folder, or local rank 0's failure seen by a waiting rank (one line each)."""


def default_cache_dir() -> str:
    """`$RAINBOWPO_CACHE/data`, else ~/.cache/rainbowpo/data."""
    root = os.environ.get("RAINBOWPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rainbowpo")
    return os.path.join(root, "data")


# ----------------------------------------------------------------------------- the key


def cache_key(data, sources: Sequence, tokenizer, mode: str, seed: int) -> str:
    """sha256 (24 hex) of everything the token ids depend on; see the module docstring."""
    settings = {k: v for k, v in dataclasses.asdict(data).items() if k not in NOT_IN_KEY}
    parts = {
        "version": CACHE_VERSION,
        "code": code_digest(),
        "mode": mode,
        "settings": settings,
        "sources": [
            {"content": source_digest(s), "split": s.split, "columns": s.columns, "weight": s.weight}
            for s in sources
        ],
        "seed": seed if any(s.weight % 1 for s in sources) else None,  # only fractional weights draw rows
        "tokenizer": tokenizer_digest(tokenizer),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def code_digest() -> str:
    """Hash of the code that turns rows into ids (ours, and the tokenizer libraries' versions): a change
    to it invalidates old caches."""
    import tokenizers
    import transformers

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256(
        f"transformers {transformers.__version__} tokenizers {tokenizers.__version__}".encode()
    )
    for name in CODE_FILES:
        with open(os.path.join(package, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()


def source_digest(src) -> str:
    """sha256 of a file's bytes, of every file in a `save_to_disk` folder, or a hub dataset's fingerprint."""
    path = src.path
    if os.path.isfile(path):  # the bytes and the extension (which picks the reader), not the name
        return _hash_files([path], path) + os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
        return _hash_files(files, path)
    from rainbowpo.data.sources import read_source  # a hub name: datasets' own fingerprint of its files

    return f"hub:{path}:{read_source(src)._fingerprint}"


def _hash_files(files: list[str], root: str) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """Hash of the tokenizer as `save_pretrained` writes it (vocab, merges, specials, chat template)."""
    with tempfile.TemporaryDirectory(prefix="rainbowpo-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        files = sorted(os.path.join(tmp, f) for f in os.listdir(tmp))
        return _hash_files(files, tmp) + ":" + str(getattr(tokenizer, "chat_template", None))


# ----------------------------------------------------------------------------- build once, wait, read


def load_or_build(
    root: str,
    key: str,
    build: Callable[[str], None],
    local_rank: int | None = None,
    timeout: float | None = None,
) -> tuple[str, bool]:
    """The complete folder `root/key` and whether this process built it.

    Local rank 0 calls `build(tmp_folder)` (which writes the files) and renames the folder into place;
    other local ranks wait for it (or for rank 0's `.error` marker) and then read it.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    timeout = float(os.environ.get("RAINBOWPO_DATA_WAIT_S", WAIT_TIMEOUT_S)) if timeout is None else timeout
    folder = os.path.join(root, key)
    if os.path.isdir(folder):
        return folder, False
    if local_rank != 0:
        _wait(folder, timeout, local_rank)
        return folder, False
    os.makedirs(root, exist_ok=True)
    marker = folder + ".error"
    if os.path.exists(marker):
        os.remove(marker)  # a previous run's failure
    tmp = tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root)
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        build(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another node's rank 0 (shared file system) finished first: use its copy
            if not os.path.isdir(folder):
                raise
    except BaseException as exc:
        _write_error(marker, exc)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, True


def _write_error(marker: str, exc: BaseException) -> None:
    message = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    text = json.dumps({"ppid": os.getppid(), "error": f"{type(exc).__name__}: {message}"})
    part = f"{marker}.{os.getpid()}"
    with open(part, "w") as f:
        f.write(text)
    os.replace(part, marker)


def _wait(folder: str, timeout: float, local_rank: int) -> None:
    marker, start = folder + ".error", time.time()
    while not os.path.isdir(folder):
        if os.path.exists(marker):
            error = _read_error(marker, start)
            if error:
                raise CacheError(f"local rank 0 failed to tokenize the data into {folder}: {error}")
        if time.time() - start > timeout:
            raise CacheError(
                f"local rank {local_rank} waited {timeout:.0f} s for local rank 0 to write the data cache "
                f"{folder}; is rank 0 still tokenizing? Raise the wait with RAINBOWPO_DATA_WAIT_S or "
                "tokenize first on one process"
            )
        time.sleep(POLL_S)


def _read_error(marker: str, start: float) -> str | None:
    """Rank 0's message if the marker is from this launch (same parent process, or written since we began)."""
    try:
        with open(marker) as f:
            info = json.load(f)
        fresh = info.get("ppid") == os.getppid() or os.path.getmtime(marker) >= start
    except (OSError, ValueError):
        return None  # being replaced right now, or stale junk: keep waiting
    return info.get("error") if fresh else None


def write(folder: str, id_chunks: Iterable, offsets: np.ndarray, k: int, key: str, summary: dict) -> None:
    """The cache files of one tokenized set (into `build`'s temporary folder); the ids arrive in chunks
    and go straight to the file, never all in memory at once."""
    ids = np.lib.format.open_memmap(
        os.path.join(folder, "ids.npy"), mode="w+", dtype=np.int32, shape=(int(offsets[-1]),)
    )
    at = 0
    for chunk in id_chunks:
        ids[at : at + len(chunk)] = chunk
        at += len(chunk)
    if at != len(ids):
        raise RuntimeError(f"data cache: {at} ids written, the offsets count {len(ids)}")
    ids.flush()
    del ids
    np.save(os.path.join(folder, "offsets.npy"), np.ascontiguousarray(offsets, dtype=np.int64))
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(summary, f)
    meta = {"version": CACHE_VERSION, "key": key, "rows": (len(offsets) - 1) // k, "k": k}
    with open(os.path.join(folder, "meta.json"), "w") as f:  # last: its presence marks a complete write
        json.dump(meta, f)


def read(folder: str, k: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(ids, offsets) memory-mapped, and the summary dict; a broken folder is one CacheError line."""
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
        with open(os.path.join(folder, "summary.json")) as f:
            summary = json.load(f)
        ids = np.load(os.path.join(folder, "ids.npy"), mmap_mode="r")
        offsets = np.load(os.path.join(folder, "offsets.npy"), mmap_mode="r")
        problem = _check(meta, ids, offsets, k, os.path.basename(folder))
    except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:
        problem = f"{type(exc).__name__}: {(str(exc).strip() or '?').splitlines()[0]}"
    if problem:
        raise CacheError(f"data cache {folder} is unreadable ({problem}); delete that folder and run again")
    return ids, offsets, summary


def _check(meta: dict, ids: np.ndarray, offsets: np.ndarray, k: int, key: str) -> str | None:
    if meta.get("version") != CACHE_VERSION or meta.get("key") != key or meta.get("k") != k:
        return f"meta.json says {meta}, expected version {CACHE_VERSION}, key {key}, k {k}"
    if ids.ndim != 1 or ids.dtype != np.int32 or offsets.ndim != 1 or offsets.dtype != np.int64:
        return "ids.npy / offsets.npy have the wrong shape or type"
    if len(offsets) != meta["rows"] * k + 1 or offsets[0] != 0 or offsets[-1] != len(ids):
        return f"offsets.npy does not match {meta['rows']} rows of {len(ids)} ids"
    if np.any(np.diff(offsets) < 0):
        return "offsets.npy is not increasing"
    return None


class TokenizedSet(Sequence):
    """Token ids of N rows as views of two arrays; `set[i]` builds row i's example on demand.

    `make(row_id, *segment_lists)` is PairExample or SFTExample; `segments(i)` gives the int32 views
    themselves; `num_tokens` is the per-row token count the batch planner needs, without building rows.
    """

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, k: int, make: Callable, folder: str = ""):
        self.ids, self.offsets, self.k, self.make, self.folder = ids, offsets, k, make, folder

    def __len__(self) -> int:
        return (len(self.offsets) - 1) // self.k

    def segments(self, i: int) -> tuple[np.ndarray, ...]:
        o = self.offsets[i * self.k : (i + 1) * self.k + 1]
        return tuple(self.ids[o[j] : o[j + 1]] for j in range(self.k))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} outside the {n} rows")
        i = i % n
        return self.make(i, *(s.tolist() for s in self.segments(i)))

    def lengths(self) -> np.ndarray:
        """[rows, k] token counts of every segment."""
        return np.diff(self.offsets).reshape(len(self), self.k)

    @property
    def num_tokens(self) -> np.ndarray:
        """Tokens through the model per row: prompt twice + both responses (pairs), prompt + completion (SFT)."""
        lengths = self.lengths()
        return lengths.sum(axis=1) + (lengths[:, 0] if self.k == 3 else 0)

    def as_lists(self) -> list:
        """Every row as an example with Python lists (tests, small sets)."""
        return [self[i] for i in range(len(self))]
