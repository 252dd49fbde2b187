"""The tokenized-data cache (rainbowpo.data.cache): hit, a miss on each kind of change, a corrupt folder,
two local ranks sharing one build, rank 0's failure reaching the waiting rank, and cached == a plain
per-row loop (the pre-cache code path, written out here independently of `datasets.map`)."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from rainbowpo.config import load_config
from rainbowpo.data import cache
from rainbowpo.data import tokenize as tk
from rainbowpo.data.formats import BadRow, source_format

WORDS = "alpha beta gamma one two red blue sort héllo".split()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def random_rows(n, seed=0):
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [
        {"prompt": text(1, 12), "chosen": text(1, 14), "rejected": text(1, 14), "extra": i} for i in range(n)
    ]


def config(tmp_path, src, **data):
    over = ["model.path=x", f"data.train={src}", f"data.cache_dir={tmp_path / 'cache'}"]
    return load_config(None, over + [f"data.{k}={v}" for k, v in data.items()])


@pytest.fixture
def builds(monkeypatch):
    """Counts the builds (tokenizations) that load_examples runs."""
    calls = []
    real = tk._build

    def counted(*args):
        calls.append(args[1])  # the key
        return real(*args)

    monkeypatch.setattr(tk, "_build", counted)
    return calls


def load(cfg, tok, mode="preference"):
    return tk.load_examples(cfg.data, cfg.data.train, tok, mode, 0)


def test_second_load_is_a_hit_and_equal(tmp_path, toks, builds):
    src = write_jsonl(tmp_path / "rows.jsonl", random_rows(40))
    cfg = config(tmp_path, src, max_length=12, max_prompt_length=6)
    first, s1 = load(cfg, toks["sp"])
    second, s2 = load(cfg, toks["sp"])
    assert len(builds) == 1
    assert first.as_lists() == second.as_lists() and s1.format() == s2.format()
    assert isinstance(second.ids, np.memmap)  # read from the files, not held as Python lists
    # settings that only batch the ids, and the file's location, are not part of the key
    moved = tmp_path / "elsewhere.jsonl"
    moved.write_bytes((tmp_path / "rows.jsonl").read_bytes())
    load(config(tmp_path, str(moved), max_length=12, max_prompt_length=6, packing=False), toks["sp"])
    assert len(builds) == 1


def test_each_kind_of_change_rebuilds(tmp_path, toks, builds):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, random_rows(10))
    base = config(tmp_path, str(path))
    chat = copy.deepcopy(toks["bpe_chat"])
    load(base, toks["bpe"])
    load(base, toks["sp"])  # another tokenizer
    load(config(tmp_path, str(path), max_length=20, max_prompt_length=8), toks["bpe"])  # a data setting
    load(config(tmp_path, str(path), truncation_keep_eos=True), toks["bpe"])  # another data setting
    load(base, chat)
    chat.chat_template = chat.chat_template.replace("<|im_start|>assistant", "<|im_start|>bot")
    load(base, chat)  # same vocab, another chat template
    write_jsonl(path, random_rows(10, seed=1))  # same path, new content
    ex, _ = load(base, toks["bpe"])
    assert len(builds) == len(set(builds)) == 7
    load(base, toks["bpe"])
    assert len(builds) == 7  # and that last one is now a hit
    assert len(os.listdir(tmp_path / "cache")) == 7  # no temporary folders left behind


def test_corrupt_cache_is_one_line_naming_the_folder(tmp_path, toks):
    src = write_jsonl(tmp_path / "rows.jsonl", random_rows(5))
    cfg = config(tmp_path, src)
    load(cfg, toks["bpe"])
    (folder,) = [tmp_path / "cache" / d for d in os.listdir(tmp_path / "cache")]
    offsets = np.load(folder / "offsets.npy")
    np.save(folder / "offsets.npy", offsets[:-1])  # a row's end lost
    with pytest.raises(cache.CacheError) as err:
        load(cfg, toks["bpe"])
    message = str(err.value)
    assert "\n" not in message and str(folder) in message and "delete that folder" in message
    (folder / "ids.npy").write_bytes(b"not numpy")
    with pytest.raises(cache.CacheError, match="ids.npy|pickle|magic|unreadable"):
        load(cfg, toks["bpe"])
    (folder / "meta.json").unlink()
    with pytest.raises(cache.CacheError, match="meta.json"):
        load(cfg, toks["bpe"])


def reference_examples(cfg, tok, rows_per_source, mode="preference"):
    """The pre-cache tokenize loop, row by row in Python lists (main's load_examples, without datasets)."""
    data, out = cfg.data, []
    counts = {"read": 0, "truncated": 0, "dropped": {}, "skipped": {}}
    summary = tk.DataSummary()
    for rows in rows_per_source:
        settings = tk.RowSettings.of(data, mode, source_format(rows[0], data.format, mode))
        for row in rows:
            counts["read"] += 1
            try:
                ids = tk.tokenize_row(tok, row, settings)
            except BadRow as bad:
                summary.skipped[bad.kind] += 1
                continue
            ids = tk.truncate(data, tok, ids.pop("prompt_ids"), list(ids.values()), summary)
            if ids is not None:
                make = tk.PairExample if mode == "preference" else tk.SFTExample
                out.append(make(len(out), ids[0], *ids[1]))
    counts.update(truncated=summary.truncated, dropped=dict(summary.dropped), skipped=dict(summary.skipped))
    return out, counts


@pytest.mark.parametrize("num_proc", [1, 2])
def test_cached_equals_the_plain_loop(tmp_path, toks, num_proc):
    a = random_rows(60, seed=2)
    a[3] = {"prompt": "alpha", "chosen": "", "rejected": "two"}  # skipped: empty
    a[7] = {"prompt": "alpha", "chosen": "one", "rejected": "one"}  # skipped: identical
    b = random_rows(25, seed=3)
    src = f"[{{path: {write_jsonl(tmp_path / 'a.jsonl', a)}}}, {{path: {write_jsonl(tmp_path / 'b.jsonl', b)}}}]"
    cfg = config(tmp_path, src, max_length=14, max_prompt_length=6, on_bad_row="skip", num_proc=num_proc)
    got, summary = load(cfg, toks["sp"])
    want, counts = reference_examples(cfg, toks["sp"], [a, b])
    assert got.as_lists() == want
    assert summary.read == counts["read"] == 85 and summary.kept == len(want)
    assert summary.truncated == counts["truncated"] > 0
    assert dict(summary.dropped) == counts["dropped"] and dict(summary.skipped) == counts["skipped"]
    assert summary.prompt_lengths == [len(e.prompt_ids) for e in want]
    assert got.num_tokens.tolist() == [e.num_tokens for e in want]
    assert got[-1] == want[-1] and got[2:4] == want[2:4]


def test_sft_rows_round_trip(tmp_path, toks):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in random_rows(12, seed=4)]
    cfg = config(tmp_path, write_jsonl(tmp_path / "sft.jsonl", rows), max_length=10, max_prompt_length=5)
    got, _ = load(cfg, toks["bpe"], mode="sft")
    want, _ = reference_examples(cfg, toks["bpe"], [rows], mode="sft")
    assert got.as_lists() == want and got.num_tokens.tolist() == [e.num_tokens for e in want]


def test_first_bad_row_in_source_order_is_the_error(tmp_path, toks, builds):
    rows = random_rows(600)
    rows[450] = {"prompt": "alpha", "chosen": "", "rejected": "two"}
    rows[520] = {"prompt": "alpha"}
    cfg = config(tmp_path, write_jsonl(tmp_path / "rows.jsonl", rows), num_proc=2)
    with pytest.raises(ValueError, match=r"rows.jsonl row 451: 'chosen' is empty"):
        load(cfg, toks["bpe"])
    assert os.listdir(tmp_path / "cache") == [f"{builds[0]}.error"]  # nothing cached, the error marked


def test_waiting_rank_gets_rank0_error_fast(tmp_path):
    root, errors = str(tmp_path), []

    def waiter():
        try:
            cache.load_or_build(root, "k1", lambda tmp: None, local_rank=1, timeout=60)
        except cache.CacheError as exc:
            errors.append((time.time(), str(exc)))

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.3)

    def fail(tmp):
        raise ValueError("data.train[0] rows.jsonl row 3: 'chosen' is empty\nsecond line")

    with pytest.raises(ValueError, match="row 3"):
        cache.load_or_build(root, "k1", fail, local_rank=0)
    failed_at = time.time()
    thread.join(10)
    ((when, message),) = errors
    assert when - failed_at < 2 and "row 3: 'chosen' is empty" in message and "\n" not in message
    assert sorted(os.listdir(root)) == ["k1.error"]


def test_stale_error_from_another_launch_is_ignored(tmp_path):
    marker = tmp_path / "k2.error"
    marker.write_text(json.dumps({"ppid": -1, "error": "ValueError: old news"}))
    past = time.time() - 3600
    os.utime(marker, (past, past))
    with pytest.raises(cache.CacheError, match="waited 1 s"):  # timed out: the old error was not taken
        cache.load_or_build(str(tmp_path), "k2", lambda tmp: None, local_rank=1, timeout=0.6)
    folder, built = cache.load_or_build(str(tmp_path), "k2", lambda tmp: None, local_rank=0)
    assert built and os.path.isdir(folder) and not marker.exists()  # rank 0 clears it


RANK_SCRIPT = """
import json, sys
from transformers import AutoTokenizer
from rainbowpo.config import load_config
from rainbowpo.data import cache, tokenize as tk
built = []
real = cache.load_or_build
def spy(*args, **kwargs):
    folder, did = real(*args, **kwargs)
    built.append(did)
    return folder, did
cache.load_or_build = spy
cfg = load_config(None, ["model.path=x", "data.train=" + sys.argv[1], "data.cache_dir=" + sys.argv[2]])
exs, summary = tk.load_examples(cfg.data, cfg.data.train, AutoTokenizer.from_pretrained(sys.argv[3]), "preference", 0)
print(json.dumps({"built": built[0], "rows": [[e.prompt_ids, e.chosen_ids, e.rejected_ids] for e in exs],
                  "summary": summary.format()}))
"""


@pytest.mark.slow  # two fresh interpreters importing transformers + datasets: 5 s idle, ~22 s under load
def test_two_local_ranks_share_one_build(tmp_path, toks):
    """Two real processes: local rank 1 starts first and waits; local rank 0 builds; both map the same rows."""
    src = write_jsonl(tmp_path / "rows.jsonl", random_rows(30))
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT))
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def start(rank):
        args = [sys.executable, str(script), src, str(tmp_path / "cache"), toks["bpe_dir"]]
        return subprocess.Popen(args, env={**env, "LOCAL_RANK": str(rank)}, stdout=subprocess.PIPE, text=True)

    waiter = start(1)
    time.sleep(1.0)
    builder = start(0)
    out0, out1 = (
        json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in (builder, waiter)
    )
    assert builder.returncode == waiter.returncode == 0
    assert out0["built"] and not out1["built"]
    assert out0["rows"] == out1["rows"] and len(out0["rows"]) == 30 and out0["summary"] == out1["summary"]
    assert len(os.listdir(tmp_path / "cache")) == 1
