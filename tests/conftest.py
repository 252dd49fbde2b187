"""Shared pytest set-up: deterministic, quiet, CPU-only."""

import os
import random

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
if "RAINBOWPO_CACHE" not in os.environ:  # tokenized-data caches of tests and their subprocesses: not in ~
    import atexit
    import shutil
    import tempfile

    os.environ["RAINBOWPO_CACHE"] = tempfile.mkdtemp(prefix="rainbowpo-test-cache-")
    atexit.register(shutil.rmtree, os.environ["RAINBOWPO_CACHE"], True)


TOKENIZER_WORDS = "alpha beta gamma one two red blue sort héllo".split()


@pytest.fixture(scope="session")
def toks(tmp_path_factory):
    """Tokenizers trained on the fly: sentencepiece (byte fallback, BOS) and BPE, each with and without
    a chat template; `bpe_dir` is the folder of the plain BPE one."""
    from rainbowpo.tiny import CHATML_TEMPLATE, train_bpe, train_sentencepiece

    rng = random.Random(0)
    texts = [" ".join(rng.choice(TOKENIZER_WORDS) for _ in range(8)) for _ in range(300)]
    d = tmp_path_factory.mktemp("tok")
    return {
        "sp": train_sentencepiece(texts, str(d / "sp")),
        "sp_chat": train_sentencepiece(texts, str(d / "spc"), chat_template=CHATML_TEMPLATE),
        "bpe": train_bpe(texts, str(d / "bpe")),
        "bpe_chat": train_bpe(texts, str(d / "bpec"), chat_template=CHATML_TEMPLATE),
        "bpe_dir": str(d / "bpe"),
    }
