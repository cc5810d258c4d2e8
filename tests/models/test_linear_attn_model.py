"""Linear-attention LM through the engine == a token-by-token pure-torch implementation written here.

The reference below shares no code with packserve: it reads the checkpoint's safetensors and runs
the recurrence S_t = S_{t-1} + phi(k_t) v_t^T, z_t = z_{t-1} + phi(k_t) one token at a time (and
full causal softmax attention with rotary positions for the hybrid model's softmax layers).
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from packserve.checkpoints import build_linear_attn_checkpoint
from packserve.engine.engine import LLMEngine, engine_config
from packserve.engine.request import SamplingParams
from tests.support.engine_cases import run_with_arrivals


def phi_ref(name: str, x: torch.Tensor, is_query: bool) -> torch.Tensor:
    if name == "elu1":
        return F.elu(x) + 1
    if name == "relu":
        return F.relu(x)
    if name == "nalaformer":  # sign split; the query's power grows with its norm
        if is_query:
            n = x.norm().clamp_min(1e-6)
            p = 3 * (0.5 + torch.tanh(n))
            return torch.cat([F.relu(x / n) ** p, F.relu(-x / n) ** p])
        return torch.cat([F.relu(x) ** 3, F.relu(-x) ** 3])
    raise NotImplementedError(name)


class RefLM:
    def __init__(self, path: str):
        self.cfg = json.loads(Path(path, "config.json").read_text())
        self.w = {k: v.double() for k, v in load_file(str(Path(path, "model.safetensors"))).items()}

    def rms(self, x, w):
        return w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg["rms_norm_eps"]))

    def rope(self, x, pos):
        d = x.shape[-1]
        inv = 1.0 / (self.cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        ang = pos * inv
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)

    def greedy(self, prompt: list[int], new: int) -> list[int]:
        c = self.cfg
        hq, hkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        group = hq // hkv
        soft = set(c["softmax_attention_layers"])
        L = c["num_hidden_layers"]
        fw = 2 * hd if c["feature_map"] == "nalaformer" else hd
        S = [torch.zeros(hkv, fw, hd, dtype=torch.float64) for _ in range(L)]
        z = [torch.zeros(hkv, fw, dtype=torch.float64) for _ in range(L)]
        kv = [([], []) for _ in range(L)]
        tokens, out = list(prompt), []
        for t in range(len(prompt) + new - 1):
            x = self.w["model.embed_tokens.weight"][tokens[t]]
            for i in range(L):
                p = f"model.layers.{i}."
                h = self.rms(x, self.w[p + "input_layernorm.weight"])
                q = (self.w[p + "self_attn.q_proj.weight"] @ h).view(hq, hd)
                k = (self.w[p + "self_attn.k_proj.weight"] @ h).view(hkv, hd)
                v = (self.w[p + "self_attn.v_proj.weight"] @ h).view(hkv, hd)
                o = torch.empty(hq, hd, dtype=torch.float64)
                if i in soft:
                    q, k = self.rope(q, t), self.rope(k, t)
                    kv[i][0].append(k)
                    kv[i][1].append(v)
                    K, V = torch.stack(kv[i][0]), torch.stack(kv[i][1])  # [t+1, hkv, hd]
                    for hh in range(hq):
                        a = torch.softmax(K[:, hh // group] @ q[hh] / math.sqrt(hd), 0)
                        o[hh] = a @ V[:, hh // group]
                else:
                    fq = torch.stack([phi_ref(c["feature_map"], q[hh], True) for hh in range(hq)])
                    fk = torch.stack([phi_ref(c["feature_map"], k[g], False) for g in range(hkv)])
                    for g in range(hkv):
                        S[i][g] += torch.outer(fk[g], v[g])
                        z[i][g] += fk[g]
                    for hh in range(hq):
                        g = hh // group
                        num = fq[hh] @ S[i][g]
                        o[hh] = num / (fq[hh] @ z[i][g] + c["linear_attn_eps"]) if c["normalize"] else num
                x = x + self.w[p + "self_attn.o_proj.weight"] @ o.reshape(-1)
                h = self.rms(x, self.w[p + "post_attention_layernorm.weight"])
                m = F.silu(self.w[p + "mlp.gate_proj.weight"] @ h) * (self.w[p + "mlp.up_proj.weight"] @ h)
                x = x + self.w[p + "mlp.down_proj.weight"] @ m
            if t >= len(prompt) - 1:
                logits = self.w["lm_head.weight"] @ self.rms(x, self.w["model.norm.weight"])
                nxt = int(logits.argmax())
                out.append(nxt)
                tokens.append(nxt)
        return out


LENGTHS = [1, 2, 15, 63, 64, 65, 130, 7]
NEW = 12

MODELS = {
    "pure-elu1": dict(feature_map="elu1", normalize=True),
    "hybrid-relu-unnormalized": dict(feature_map="relu", normalize=False, softmax_attention_layers=[1],
                                     initializer_range=0.1),
    "nalaformer-gqa": dict(feature_map="nalaformer", normalize=True, num_attention_heads=4, num_key_value_heads=1),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request, tmp_path_factory):
    path = build_linear_attn_checkpoint(tmp_path_factory.mktemp(request.param), seed=1, **MODELS[request.param])
    return str(path)


def prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 500, (n,), generator=g).tolist() for n in LENGTHS]


def run_engine(path, ps, arrive_every=2, **opts):
    engine = LLMEngine(engine_config(path, **opts))
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    # Ragged prompts arriving while others decode.
    got = run_with_arrivals(engine, ps, params, every=arrive_every, max_steps=1000)
    assert engine.allocator.num_used == 0 and engine.state_slots.num_free == engine.state_slots.num_slots
    run_engine.last = engine
    return got


def test_greedy_matches_token_by_token_reference(model):
    ps = prompts()
    ref = RefLM(model)
    want = [ref.greedy(p, NEW) for p in ps]
    assert run_engine(model, ps) == want
    # Chunked prefill resumes from the saved state; a tiny KV cache (hybrid) forces preemption.
    assert run_engine(model, ps, arrive_every=1, max_num_batched_tokens=40, max_num_seqs=3) == want


def test_preemption_and_state_reuse(model, tmp_path):
    ps = prompts(seed=1)
    ref = RefLM(model)
    want = [ref.greedy(p, NEW) for p in ps]
    # Few state slots (max_num_seqs) and few KV blocks: slots are reused and requests preempted.
    assert run_engine(model, ps, arrive_every=1, max_num_seqs=3, num_kv_blocks=10, block_size=16) == want
    assert run_engine.last.scheduler.num_preemptions > 0
