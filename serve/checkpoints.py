"""Build small Hugging Face checkpoint folders offline.

Tests, benchmarks and the built-in demo model need real checkpoint folders
(config.json + safetensors + tokenizer files) without any download. The
tokenizer is a byte-level BPE trained on a small embedded corpus, so every
byte sequence round-trips and multi-byte characters span several tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CORPUS = """\
The quick brown fox jumps over the lazy dog. Packed prefill puts many prompts
into one sequence, with a block diagonal causal mask and position ids that
restart at every prompt. Each prompt keeps its own cache of keys and values,
then every running request decodes one token per step.
Hello world! How are you today? I am fine, thank you. What is the capital of
France? Paris is the capital of France. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.
def main():\n    print("hello")\n    return 0\n
Unicode: café, naïve, 日本語, 中文, emoji 🙂🚀, Ελληνικά, русский текст.
Once upon a time there was a small model that served many requests at once.
"""

# Role-tagged turns; with tools, a system turn lists them and asks for Hermes-style calls (<tool_call> JSON, the
# format packserve.api.tool_parsers detects from this template). Without tools a chat renders as
# "<|role|>\ncontent<|end|>\n" per message.
CHAT_TEMPLATE = (  # (no newline right after a block tag: templates render with trim_blocks)
    "{% if tools %}<|system|>\n"
    "{% if messages[0]['role'] in ['system', 'developer'] %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "# Tools\n\nYou may call one or more functions. Their signatures are within <tools></tools>:\n<tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n\n"
    "For each call, write a JSON object with the function's name and arguments within <tool_call></tool_call> "
    "tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if not (tools and loop.first and message['role'] in ['system', 'developer']) %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% if message['tool_calls'] is defined and message['tool_calls'] %}{% for call in message['tool_calls'] %}"
    "{% if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}<tool_call>\n"
    "{\"name\": {{ call['function']['name'] | tojson }}, \"arguments\": {{ call['function']['arguments'] | tojson }}}"
    "\n</tool_call>{% endfor %}{% endif %}<|end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|begin|>", "<|end|>", "<|pad|>"]


def build_tokenizer(vocab_size: int = 512, corpus: str = CORPUS, chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer trained offline; returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def save_checkpoint(model: Any, tokenizer: Any, path: str | Path) -> Path:
    """Save a transformers model + tokenizer as a checkpoint folder (safetensors)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def random_hf_model(config: Any, seed: int = 0, dtype: Any = None):
    """A transformers causal LM with seeded random weights, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def tiny_config(arch: str, vocab_size: int, **overrides: Any):
    """Small transformers configs for each supported family (fp32 tests)."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab_size, initializer_range=0.15, bos_token_id=1, eos_token_id=0, pad_token_id=3)
    if arch == "llama":
        cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 256},
                   tie_word_embeddings=True)
        return LlamaConfig(**{**common, **cfg, **overrides})
    if arch == "mistral":
        cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=1, max_position_embeddings=1024, sliding_window=None,
                   tie_word_embeddings=False)
        return MistralConfig(**{**common, **cfg, **overrides})
    if arch == "qwen2":
        cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
                   use_sliding_window=False)
        return Qwen2Config(**{**common, **cfg, **overrides})
    if arch == "qwen3":
        cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                   tie_word_embeddings=False, use_sliding_window=False)
        return Qwen3Config(**{**common, **cfg, **overrides})
    if arch == "gpt2":
        cfg = dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024, bos_token_id=1, eos_token_id=0)
        return GPT2Config(**{**common, **cfg, **overrides})
    raise ValueError(f"unknown tiny arch {arch!r}")


def build_tiny_checkpoint(arch: str, path: str | Path, seed: int = 0, vocab_size: int = 512, **overrides: Any) -> Path:
    """Build and save a seeded random checkpoint of a supported family."""
    tokenizer = build_tokenizer(vocab_size)
    vocab = max(vocab_size, len(tokenizer))
    model = random_hf_model(tiny_config(arch, vocab, **overrides), seed=seed)
    return save_checkpoint(model, tokenizer, path)


def write_config(path: str | Path, config: dict) -> None:
    Path(path, "config.json").write_text(json.dumps(config, indent=2))


LINEAR_ATTN_ARCH = "PackserveLinearAttentionForCausalLM"


def linear_attn_config(vocab_size: int, **overrides: Any) -> dict:
    """config.json of packserve's own linear-attention LM family (serve/models/linear_attn.py)."""
    cfg = dict(
        architectures=[LINEAR_ATTN_ARCH], model_type="packserve_linear_attention",
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        feature_map="elu1", normalize=True, linear_attn_eps=1e-6,
        softmax_attention_layers=[],  # indices of softmax-attention layers (hybrid models)
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048,
        tie_word_embeddings=False, initializer_range=0.15, bos_token_id=1, eos_token_id=0,
        dtype="float32",
    )
    cfg.update(overrides)
    return cfg


def linear_attn_state_dict(cfg: dict, seed: int = 0) -> dict:
    """Seeded random weights in the Llama naming the family shares."""
    import torch

    g = torch.Generator().manual_seed(seed)
    std = cfg["initializer_range"]
    d, inter, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    hq, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def w(*shape):
        return torch.randn(*shape, generator=g) * std

    def gain(n):
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    sd = {"model.embed_tokens.weight": w(cfg["vocab_size"], d), "model.norm.weight": gain(d)}
    if not cfg.get("tie_word_embeddings"):
        sd["lm_head.weight"] = w(cfg["vocab_size"], d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update({
            p + "input_layernorm.weight": gain(d), p + "post_attention_layernorm.weight": gain(d),
            p + "self_attn.q_proj.weight": w(hq * hd, d), p + "self_attn.k_proj.weight": w(hkv * hd, d),
            p + "self_attn.v_proj.weight": w(hkv * hd, d), p + "self_attn.o_proj.weight": w(d, hq * hd),
            p + "mlp.gate_proj.weight": w(inter, d), p + "mlp.up_proj.weight": w(inter, d),
            p + "mlp.down_proj.weight": w(d, inter),
        })
    return sd


def build_linear_attn_checkpoint(path: str | Path, seed: int = 0, vocab_size: int = 512, **overrides: Any) -> Path:
    """A linear-attention (or hybrid) checkpoint folder: config.json + model.safetensors + tokenizer."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    cfg = linear_attn_config(max(vocab_size, len(tokenizer)), **overrides)
    write_config(path, cfg)
    save_file({k: v.contiguous() for k, v in linear_attn_state_dict(cfg, seed).items()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(path)
    return path
