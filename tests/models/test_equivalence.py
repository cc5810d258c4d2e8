"""Packed prefill == transformers' per-prompt forward, for every architecture and CPU backend."""

import json
from pathlib import Path

import pytest
import torch

from packserve import LLM
from packserve.models.registry import UnsupportedArchitecture

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
BACKENDS = ("varlen", "sdpa", "flex")  # varlen on CPU: one causal SDPA call per prompt
LENGTHS = [1, 2, 15, 63, 64, 65, 3, 100, 127, 128, 129, 200, 31, 7, 250, 300]  # 16 ragged prompts


def ragged_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in LENGTHS]


def hf_last_logits(path: str, prompts) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [hf(torch.tensor([p])).logits[0, -1] for p in prompts]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_prefill_matches_transformers(arch, checkpoint_factory):
    path = checkpoint_factory(arch)
    prompts = ragged_prompts(500)
    refs = hf_last_logits(path, prompts)
    for backend in BACKENDS:
        llm = LLM(path, backend=backend, num_kv_blocks=256)
        logits = llm.engine.prefill_logits(prompts)
        assert logits.shape == (len(prompts), llm.engine.info.vocab_size)
        for i, ref in enumerate(refs):
            assert rel_err(logits[i], ref) <= 1e-4, (arch, backend, LENGTHS[i])


def test_packing_layout_is_independent_of_results(checkpoint_factory):
    """A fixed small row capacity (many rows) and best-fit give the same logits as the default."""
    path = checkpoint_factory("llama")
    prompts = ragged_prompts(500, seed=1)
    base = LLM(path, num_kv_blocks=256).engine.prefill_logits(prompts)
    other = LLM(path, num_kv_blocks=256, packing="bfd", pack_length=320).engine.prefill_logits(prompts)
    assert rel_err(other, base) <= 1e-5


def test_old_style_rope_config_loads(checkpoint_factory, tmp_path):
    """Released checkpoints carry rope_theta / rope_scaling at the top level (transformers < 5)."""
    import shutil

    src = Path(checkpoint_factory("llama"))
    dst = tmp_path / "old"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (dst / "config.json").write_text(json.dumps(cfg))
    prompts = ragged_prompts(500)[:6]
    refs = hf_last_logits(str(src), prompts)
    logits = LLM(str(dst), num_kv_blocks=256).engine.prefill_logits(prompts)
    for i, ref in enumerate(refs):
        assert rel_err(logits[i], ref) <= 1e-4


def test_unknown_architecture_lists_supported(tmp_path, checkpoint_factory):
    import shutil

    dst = tmp_path / "x"
    shutil.copytree(checkpoint_factory("llama"), dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitecture, match="LlamaForCausalLM.*Qwen3ForCausalLM"):
        LLM(str(dst))


def test_xformers_backend_falls_back_on_cpu(checkpoint_factory, caplog):
    llm = LLM(checkpoint_factory("llama"), backend="xformers", num_kv_blocks=16)
    assert llm.engine.backend.name == "sdpa"
    assert "xformers" in caplog.text


def test_auto_backend_is_varlen():
    """auto: varlen on CUDA and CPU alike (CPU: per-prompt causal SDPA over the flat tokens, no rows)."""
    from packserve.layers.attention import VarlenBackend, select_backend

    backend = select_backend("auto", torch.device("cpu"))
    assert isinstance(backend, VarlenBackend) and not backend.uses_rows
