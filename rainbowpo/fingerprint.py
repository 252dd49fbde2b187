"""A cheap, stable fingerprint of a model folder: config.json plus each weight file's name, size and
first/last MiB — fast even for 70B checkpoints, and it changes whenever the weights are rewritten."""

from __future__ import annotations

import hashlib
import os


def model_fingerprint(path: str) -> str:
    h = hashlib.sha256()
    if not os.path.isdir(path):
        return hashlib.sha256(path.encode()).hexdigest()[:16]
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name == "config.json" or name.endswith((".safetensors", ".bin", ".pt")):
            size = os.path.getsize(full)
            h.update(f"{name}:{size}".encode())
            with open(full, "rb") as f:
                h.update(f.read(1 << 20))
                f.seek(max(0, size - (1 << 20)))
                h.update(f.read(1 << 20))
    return h.hexdigest()[:16]
