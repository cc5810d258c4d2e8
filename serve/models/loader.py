"""Load a local Hugging Face checkpoint folder: config.json + *.safetensors (+ tokenizer files)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import torch

from packserve.models import registry

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    pass


def read_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"model path {str(path)!r} is not a directory")
    if not cfg_file.is_file():
        raise CheckpointError(f"no config.json in {str(path)!r}")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object, got {type(cfg).__name__}")
    # Multimodal/nested configs keep the LM settings under text_config.
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = {**cfg, **cfg["text_config"]}
    return cfg


class LazyTensor:
    """A checkpoint tensor read on demand: whole (`as_tensor`) or one slice along a dimension (`narrow`), so a
    tensor-parallel rank reads only its shard of the split weights from the file."""

    def __init__(self, fh, name: str, dtype: torch.dtype):
        self._fh, self.name, self._dtype = fh, name, dtype
        self._slice = fh.get_slice(name)
        self.shape = torch.Size(self._slice.get_shape())

    def _convert(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self._dtype) if t.is_floating_point() else t

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self._convert(self._slice[tuple(index)])

    def load(self) -> torch.Tensor:
        return self._convert(self._fh.get_tensor(self.name))


def iter_safetensors(path: str | Path, dtype: torch.dtype, lazy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every checkpoint tensor in `dtype`; lazy: LazyTensor handles instead (read on use)."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {str(path)!r}")
    for f in files:
        try:  # a truncated or empty file: one line naming it, not the library's traceback
            fh = safe_open(str(f), framework="pt", device="cpu")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{f}: not a readable safetensors file ({exc})") from None
        with fh:
            for name in fh.keys():
                if lazy:
                    yield name, LazyTensor(fh, name, dtype)
                    continue
                try:
                    t = fh.get_tensor(name)
                except (SafetensorError, OSError) as exc:
                    raise CheckpointError(f"{f}: tensor {name!r} could not be read ({exc})") from None
                yield name, (t.to(dtype) if t.is_floating_point() else t)


def checkpoint_dtype(cfg: dict) -> torch.dtype:
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, torch.float32)


def resolve_dtype(requested: str, cfg: dict, device: torch.device) -> torch.dtype:
    if device.type == "cpu":
        # No fast half precision on these CPUs: weights stored in half are upcast.
        if requested not in ("auto", "float32"):
            log.warning("dtype %s requested on CPU; running in float32", requested)
        return torch.float32
    if requested == "auto":
        dt = checkpoint_dtype(cfg)
        return torch.bfloat16 if dt == torch.float32 else dt
    return getattr(torch, requested)


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype, max_model_len: int,
               norm_mode: str = "native"):
    cfg = read_config(path)
    cls = registry.resolve(cfg)
    kwargs = {"norm_mode": norm_mode} if norm_mode != "native" else {}
    if norm_mode != "native" and "norm_mode" not in cls.__init__.__code__.co_varnames:
        raise CheckpointError(f"norm_mode {norm_mode!r} applies to Pre-LN models (GPT-2), not {cls.__name__}")
    with torch.device("cpu"):
        model = cls(cfg, max_model_len, **kwargs)
    from packserve import distributed

    # Tensor parallel: each rank reads only its shards of the split weights (LazyTensor slices).
    model.load_weights(iter_safetensors(path, torch.float64 if norm_mode != "native" else dtype,
                                        lazy=distributed.tp_size() > 1))
    model = model.to(device=device, dtype=dtype).eval()
    from packserve.layers.rotary import RotaryEmbedding

    for m in model.modules():  # RoPE tables are plain attributes (kept fp32): placed now, before the KV cache
        if isinstance(m, RotaryEmbedding):
            m.place(device)
    return model
