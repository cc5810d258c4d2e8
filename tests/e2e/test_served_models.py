"""Model families over the real HTTP server: GPT-2 with converted norms, the linear-attention LM."""

from __future__ import annotations

import pytest

from packserve import LLM, SamplingParams
from packserve.checkpoints import build_linear_attn_checkpoint, build_tiny_checkpoint
from tests.support.server_process import ServerProcess

openai = pytest.importorskip("openai")

PROMPTS = ["Hello world", "The quick brown fox jumps", "Paris is the capital of", "1 2 3 4 5 6 7 8 9 10 100"]


def completions(url: str, stream: bool, max_tokens: int = 12) -> list[str]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    out = []
    for p in PROMPTS:
        if stream:
            chunks = client.completions.create(model="m", prompt=p, max_tokens=max_tokens, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
            out.append("".join(c.choices[0].text for c in chunks if c.choices))
        else:
            r = client.completions.create(model="m", prompt=p, max_tokens=max_tokens, temperature=0,
                                          extra_body={"ignore_eos": True})
            out.append(r.choices[0].text)
    return out


def serve(path, tmp_path, *extra):
    return ServerProcess(["--model", str(path), "--served-model-name", "m", "--num-threads", "2", *extra], tmp_path)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return build_tiny_checkpoint("gpt2", tmp_path_factory.mktemp("gpt2"), seed=4)


def test_gpt2_crmsnorm_and_rmsnorm_serve_like_native(gpt2, tmp_path):
    with serve(gpt2, tmp_path, "--norm-mode", "native") as s:
        native = completions(s.url, stream=False)
    assert any(native)
    for mode in ("crmsnorm", "rmsnorm"):
        with serve(gpt2, tmp_path, "--norm-mode", mode) as s:
            assert completions(s.url, stream=True) == native, mode


def test_linear_attention_model_served(tmp_path):
    path = build_linear_attn_checkpoint(tmp_path / "la", seed=2, feature_map="nalaformer",
                                        softmax_attention_layers=[1])
    want = [o.outputs[0].text for o in LLM(str(path)).generate(
        PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))]
    with serve(path, tmp_path) as s:
        assert completions(s.url, stream=False) == want
        assert completions(s.url, stream=True) == want
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=5, temperature=0)
        assert chat.choices[0].finish_reason in ("length", "stop") and chat.usage.completion_tokens >= 1
