"""PACKSERVE_CPU_MATMUL_PRECISION=bf16: refused on CPUs without bf16 matrix instructions; where they exist, the
logits stay within bf16 rounding of transformers' fp32 forward, and small steps run exact fp32 again."""

import pytest
import torch

from packserve import LLM, SamplingParams
from packserve.config import ConfigError
from packserve.engine.precision import BF16_MIN_ROWS, CpuMatmulPrecision, bf16_mode_rounds, cpu_has_bf16

PROMPTS = [[5 + i for i in range(n)] for n in (1, 9, 40, 97)]


def test_unknown_precision_is_refused():
    with pytest.raises(ConfigError, match="must be one of"):
        CpuMatmulPrecision("fp8")


@pytest.mark.skipif(cpu_has_bf16(), reason="this CPU has bf16 matrix instructions")
def test_bf16_is_refused_without_bf16_instructions(checkpoint_factory, monkeypatch):
    monkeypatch.setenv("PACKSERVE_CPU_MATMUL_PRECISION", "bf16")
    with pytest.raises(ConfigError, match="AMX-BF16 or AVX512-BF16"):
        LLM(checkpoint_factory("llama"), device="cpu")


@pytest.mark.skipif(not cpu_has_bf16() or bf16_mode_rounds(), reason="needs bf16 instructions oneDNN's bf16 mode "
                    "does not use (AVX512-BF16 without AMX)")
def test_bf16_is_refused_where_it_would_change_nothing(checkpoint_factory, monkeypatch):
    monkeypatch.setenv("PACKSERVE_CPU_MATMUL_PRECISION", "bf16")
    with pytest.raises(ConfigError, match="would change nothing") as e:
        LLM(checkpoint_factory("llama"), device="cpu")
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not bf16_mode_rounds(), reason="needs a CPU whose fp32 matmuls oneDNN's bf16 mode rounds "
                    "(AMX-BF16 seen)")
def test_bf16_logits_stay_within_bf16_rounding_of_fp32(checkpoint_factory, monkeypatch):
    from transformers import AutoModelForCausalLM

    path = checkpoint_factory("llama", initializer_range=0.1)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    monkeypatch.setenv("PACKSERVE_CPU_MATMUL_PRECISION", "bf16")
    llm = LLM(path, device="cpu", prefix_caching=False)
    got = llm.engine.prefill_logits(PROMPTS)  # one packed step of 147 tokens: bf16
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    for i, p in enumerate(PROMPTS):
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0, -1]
        err = ((got[i] - ref).abs().max() / ref.abs().max()).item()
        assert 1e-5 < err < 5e-2, (len(p), err)  # rounded (not exact fp32), but only by bf16's ~3 digits
    # A one-token decode step runs exact fp32 again.
    llm.generate([PROMPTS[1]], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    assert torch.backends.mkldnn.matmul.fp32_precision == "ieee" and BF16_MIN_ROWS > 1


def test_fp32_mode_resets_a_precision_left_by_someone_else(checkpoint_factory):
    path = checkpoint_factory("llama")
    llm = LLM(path, device="cpu")
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        llm.generate([PROMPTS[2]], SamplingParams(max_tokens=1, temperature=0))
        assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = "ieee"
