"""The built-in demo model: `packserve serve` with no `--model` needs no download.

A small Llama-shaped checkpoint with seeded random weights and a real byte-level
BPE tokenizer (with a chat template), built deterministically on first start
into `<cache>/demo-<version>` (cache: --cache-dir / PACKSERVE_CACHE_DIR, else
~/.cache/packserve). Its text is not meaningful: it exists to exercise the
whole serving path on a fresh machine.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_VERSION = "2"  # 2: the chat template lists tools and writes tool calls
DEMO_MODEL_NAME = "packserve-demo"
MARKER = "packserve_demo.json"

# Llama shape, small enough to build in seconds and decode fast on 2 CPU cores.
DEMO_SHAPE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.15)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    return Path(os.path.expanduser("~")) / ".cache" / "packserve"


def demo_path(cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / f"demo-{DEMO_VERSION}"


def is_demo(path: str | os.PathLike) -> bool:
    return Path(path, MARKER).is_file()


def ensure_demo_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """The demo checkpoint folder, built on first use (atomic: concurrent starts never see half a folder)."""
    path = demo_path(cache_dir)
    if is_demo(path):
        return path
    from packserve.checkpoints import build_tiny_checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("building the demo model into %s (first start only)", path)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=path.parent))
    try:
        build_tiny_checkpoint("llama", tmp, seed=0, vocab_size=512, **DEMO_SHAPE)
        (tmp / MARKER).write_text(json.dumps({"name": DEMO_MODEL_NAME, "version": DEMO_VERSION,
                                              "note": "random weights; for smoke tests and demos"}))
        try:
            os.replace(tmp, path)
        except OSError:
            if not is_demo(path):  # someone else's half-built or foreign folder: not ours to keep
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
