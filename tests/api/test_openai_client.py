"""The `openai` client against the real server: streamed == non-streamed == offline LLM.generate (greedy)."""

from __future__ import annotations

import httpx
import pytest

from packserve import SamplingParams

PROMPTS = ["Hello world! How are you", "The capital of France is", "def main():"]


def _stream_text(stream) -> tuple[str, str | None, dict | None]:
    text, reason, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.text if hasattr(ch, "text") else (ch.delta.content or "")
            reason = ch.finish_reason or reason
    return text, reason, usage


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completions_stream_equals_nonstream_equals_offline(openai_client, offline_llm, prompt):
    params = dict(model="llama", prompt=prompt, max_tokens=24, temperature=0)
    full = openai_client.completions.create(**params)
    streamed, reason, usage = _stream_text(openai_client.completions.create(
        **params, stream=True, stream_options={"include_usage": True}))
    offline = offline_llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0))[0]
    assert full.choices[0].text == streamed == offline.outputs[0].text
    assert full.choices[0].finish_reason == reason == offline.outputs[0].finish_reason
    n_prompt = len(offline.prompt_token_ids)
    n_out = len(offline.outputs[0].token_ids)
    for u in (full.usage, usage):
        assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (n_prompt, n_out, n_prompt + n_out)


def test_chat_stream_equals_nonstream_equals_offline(openai_client, offline_llm):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}]
    full = openai_client.chat.completions.create(model="llama", messages=messages, max_tokens=20, temperature=0)
    streamed, reason, usage = _stream_text(openai_client.chat.completions.create(
        model="llama", messages=messages, max_completion_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    tok = offline_llm.tokenizer
    ids = tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)
    offline = offline_llm.generate([ids], SamplingParams(max_tokens=20, temperature=0))[0]
    assert full.choices[0].message.content == streamed == offline.outputs[0].text
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason == reason
    n_out = len(offline.outputs[0].token_ids)
    for u in (full.usage, usage):
        assert (u.prompt_tokens, u.completion_tokens) == (len(ids), n_out)


def test_token_id_prompt_batch_and_n(openai_client, offline_llm):
    ids = offline_llm.tokenizer.encode("Once upon a time", add_special_tokens=False)
    ids2 = offline_llm.tokenizer.encode(PROMPTS[1], add_special_tokens=False)
    out = openai_client.completions.create(model="llama", prompt=[ids, ids2], max_tokens=8, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    ref = offline_llm.generate([ids, ids2], SamplingParams(max_tokens=8, temperature=0))
    batch = openai_client.completions.create(model="llama", prompt=["Once upon a time", PROMPTS[1]], max_tokens=8,
                                             temperature=0)
    assert [c.text for c in batch.choices] == [r.outputs[0].text for r in ref]
    assert [c.text for c in out.choices] == [ref[0].outputs[0].text] * 2 + [ref[1].outputs[0].text] * 2
    assert out.usage.completion_tokens == 2 * sum(len(r.outputs[0].token_ids) for r in ref)


def test_stream_n_choices_each_complete(openai_client):
    texts, reasons = {}, {}
    for chunk in openai_client.completions.create(model="llama", prompt="Numbers: 0 1 2", max_tokens=6,
                                                  temperature=0.8, seed=3, n=3, stream=True):
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
    assert sorted(texts) == [0, 1, 2] and sorted(reasons) == [0, 1, 2]


def test_seeded_sampling_is_reproducible(openai_client):
    kw = dict(model="llama", prompt="Hello", max_tokens=12, temperature=1.0, top_p=0.9, seed=1234,
              extra_body={"top_k": 50, "min_p": 0.01})
    a = openai_client.completions.create(**kw).choices[0].text
    b = openai_client.completions.create(**kw).choices[0].text
    assert a == b


def test_logprobs_completion_and_chat(openai_client):
    out = openai_client.completions.create(model="llama", prompt="Hello", max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(t) <= 3 for t in lp.top_logprobs)
    # Greedy: the chosen token is the most likely one.
    assert all(abs(max(top.values()) - chosen) < 1e-4 for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))
    chat = openai_client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)


def test_echo_and_stop(openai_client, offline_llm):
    out = openai_client.completions.create(model="llama", prompt="Hello", max_tokens=6, temperature=0, echo=True)
    assert out.choices[0].text.startswith("Hello")
    base = offline_llm.generate(["Hello"], SamplingParams(max_tokens=12, temperature=0))[0].outputs[0].text
    stop = base[3:5]
    # The fixed seeded model makes this hold; if it ever stops holding, pick another slice, do not skip.
    assert stop.strip() and stop not in base[:3], base
    got = openai_client.completions.create(model="llama", prompt="Hello", max_tokens=12, temperature=0,
                                           stop=[stop])
    assert got.choices[0].text == base[:base.index(stop)]
    assert got.choices[0].finish_reason == "stop"


def test_echo_with_logprobs_scores_the_prompt(openai_client, offline_llm, server, auth):
    """lm-eval style loglikelihood: echo + logprobs (+ max_tokens=0) returns the prompt tokens' logprobs."""
    prompt = "The quick brown fox jumps"
    ids = offline_llm.tokenizer.encode(prompt, add_special_tokens=False)
    ref = offline_llm.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=1))[0].prompt_logprobs
    for max_tokens in (0, 3):
        out = openai_client.completions.create(model="llama", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                               echo=True, logprobs=1)
        lp = out.choices[0].logprobs
        assert out.choices[0].text.startswith(prompt)
        assert len(lp.token_logprobs) == len(ids) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:len(ids)] == pytest.approx([e[0].logprob for e in ref[1:]], abs=1e-4)
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        assert out.usage.completion_tokens == max_tokens
    # Streamed: the first chunk carries the echoed prompt and its logprobs.
    stream = openai_client.completions.create(model="llama", prompt=prompt, max_tokens=2, temperature=0,
                                              echo=True, logprobs=0, stream=True)
    chunks = [c for c in stream if c.choices]
    first = chunks[0].choices[0]
    assert first.text.startswith(prompt) and first.logprobs.token_logprobs[0] is None
    streamed = [x for c in chunks for x in (c.choices[0].logprobs.token_logprobs if c.choices[0].logprobs else [])]
    assert len(streamed) == len(ids) + 2
    assert streamed[1:len(ids)] == pytest.approx([e[0].logprob for e in ref[1:]], abs=1e-4)


def test_models_version_health(server, auth):
    r = httpx.get(server.url + "/v1/models", headers=auth)
    assert r.status_code == 200
    data = r.json()["data"]
    assert data[0]["id"] == "llama" and data[0]["demo"] is False and data[0]["max_model_len"] == 256
    assert httpx.get(server.url + "/version").json()["version"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_unknown_fields_are_ignored(server, auth):
    r = httpx.post(server.url + "/v1/completions", headers=auth,
                   json={"prompt": "Hi", "max_tokens": 2, "temperature": 0, "some_future_field": {"x": 1}})
    assert r.status_code == 200, r.text


def test_repeated_prompt_is_served_from_the_prefix_cache(openai_client, offline_llm, server, helpers):
    """The second request with the same 40-token prompt reuses its first two KV blocks: usage reports them as
    cached (OpenAI's prompt_tokens_details.cached_tokens), the hit counter moves, and the text is unchanged."""
    ids = offline_llm.tokenizer.encode("A long shared system prompt: " + "zebra quartz " * 12,
                                       add_special_tokens=False)[:40]
    assert len(ids) == 40
    hits0 = helpers["metric_values"](server.url).get("packserve:prefix_cache_hits_total", 0.0)
    first = openai_client.completions.create(model="llama", prompt=ids, max_tokens=6, temperature=0)
    second = openai_client.completions.create(model="llama", prompt=ids, max_tokens=6, temperature=0)
    assert second.choices[0].text == first.choices[0].text
    assert second.usage.prompt_tokens_details.cached_tokens == 32  # two full 16-token blocks
    assert second.usage.prompt_tokens == 40
    assert helpers["metric_values"](server.url)["packserve:prefix_cache_hits_total"] >= hits0 + 32


def test_logit_bias_forces_and_bans_tokens(openai_client, offline_llm):
    """+100 on one token makes it every greedy choice (completions and chat, streamed or not); -100 on the token
    greedy decoding picks bans it."""
    tok = offline_llm.tokenizer
    forced = tok.encode(" fox", add_special_tokens=False)[-1]
    want = tok.decode([forced] * 4)
    full = openai_client.completions.create(model="llama", prompt="Hello", max_tokens=4, temperature=0,
                                            logit_bias={str(forced): 100})
    streamed, _, _ = _stream_text(openai_client.completions.create(
        model="llama", prompt="Hello", max_tokens=4, temperature=0, logit_bias={str(forced): 100}, stream=True))
    chat = openai_client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=4, temperature=0, logit_bias={str(forced): 100})
    assert full.choices[0].text == streamed == chat.choices[0].message.content == want
    plain = offline_llm.generate(["Hello"], SamplingParams(max_tokens=1, temperature=0))[0].outputs[0].token_ids[0]
    banned = openai_client.completions.create(model="llama", prompt="Hello", max_tokens=1, temperature=0,
                                              logit_bias={str(plain): -100}, logprobs=1)
    assert banned.choices[0].text != tok.decode([plain])


def test_best_of_returns_the_candidates_with_the_highest_cumulative_logprob(openai_client):
    """best_of=4, n=2 (sampled, seeded) returns the top 2 by cumulative logprob of the same 4 candidates that n=4
    with the same seed generates (candidate j samples with seed + j either way); usage counts all 4."""
    params = dict(model="llama", prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=11)
    all4 = openai_client.completions.create(**params, n=4, logprobs=0)
    ranked = sorted(all4.choices, key=lambda c: -sum(c.logprobs.token_logprobs))
    best = openai_client.completions.create(**params, n=2, best_of=4)
    assert [c.index for c in best.choices] == [0, 1]
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]]
    assert best.choices[0].logprobs is None  # ranked with logprobs, returned without: none were asked for
    assert best.usage.completion_tokens == all4.usage.completion_tokens


def test_allowed_token_ids_and_continuous_usage_stats(openai_client, offline_llm):
    """vLLM's extras: allowed_token_ids limits sampling to a set; stream_options.continuous_usage_stats puts the
    choice's usage so far in every chunk."""
    tok = offline_llm.tokenizer
    allowed = tok.encode(" cat dog", add_special_tokens=False)
    out = openai_client.completions.create(model="llama", prompt="Hello", max_tokens=8, temperature=1.0, seed=3,
                                           logprobs=0, extra_body={"allowed_token_ids": allowed})
    assert set(out.choices[0].logprobs.tokens) <= {tok.decode([t]) for t in allowed}
    stream = openai_client.completions.create(model="llama", prompt="Hello", max_tokens=5, temperature=0,
                                              stream=True, stream_options={"include_usage": True,
                                                                           "continuous_usage_stats": True})
    usages = [c.usage for c in stream if c.choices]
    counts = [u.completion_tokens for u in usages]  # chunks may coalesce tokens: nondecreasing, ending at 5
    assert counts == sorted(counts) and counts[0] >= 1 and counts[-1] == 5 and all(u.total_tokens == u.prompt_tokens + u.completion_tokens
                                                      for u in usages)


def test_top_logprobs_always_hold_the_number_asked_for(openai_client):
    """Asking for 20 alternatives gives 20 dict entries at every position (partial-character tokens no longer
    collapse onto one "\ufffd" key), and chat's bytes rebuild every alternative's raw bytes."""
    out = openai_client.completions.create(model="llama", prompt="Bytes: \u20ac", max_tokens=8, temperature=0,
                                           logprobs=20)
    assert [len(t) for t in out.choices[0].logprobs.top_logprobs] == [20] * 8
    chat = openai_client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "\u20ac"}],
                                                 max_tokens=6, temperature=0, logprobs=True, top_logprobs=20)
    for entry in chat.choices[0].logprobs.content:
        assert len(entry.top_logprobs) == 20
        assert all(t.bytes != list("\ufffd".encode()) for t in entry.top_logprobs)


def test_return_tokens_as_token_ids(openai_client, offline_llm):
    want = offline_llm.generate(["Hello"], SamplingParams(max_tokens=3, temperature=0))[0].outputs[0].token_ids
    out = openai_client.completions.create(model="llama", prompt="Hello", max_tokens=3, temperature=0, logprobs=2,
                                           extra_body={"return_tokens_as_token_ids": True})
    lp = out.choices[0].logprobs
    assert lp.tokens == [f"token_id:{t}" for t in want]
    assert all(k.startswith("token_id:") for top in lp.top_logprobs for k in top)
    chat = openai_client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=2, temperature=0, logprobs=True, top_logprobs=1,
                                                 extra_body={"return_tokens_as_token_ids": True})
    assert all(c.token.startswith("token_id:") for c in chat.choices[0].logprobs.content)


def test_bad_words_are_never_generated(openai_client, offline_llm):
    """A word the greedy output contains, banned with bad_words (alone and after a space, as vLLM tokenizes it):
    the output changes and holds neither token sequence."""
    tok = offline_llm.tokenizer
    greedy = offline_llm.generate(["The capital"], SamplingParams(max_tokens=16, temperature=0))[0].outputs[0]
    word = next((tok.decode([t]).strip() for t in greedy.token_ids if tok.decode([t]).strip().isalpha()), None)
    if word is None:
        pytest.skip("the random model's greedy output has no alphabetic token")
    out = openai_client.completions.create(model="llama", prompt="The capital", max_tokens=16, temperature=0,
                                           logprobs=0, extra_body={"bad_words": [word],
                                                                   "return_tokens_as_token_ids": True})
    ids = [int(t.split(":")[1]) for t in out.choices[0].logprobs.tokens]
    banned = {tuple(tok.encode(w, add_special_tokens=False)) for w in (word, " " + word)}
    assert ids != list(greedy.token_ids)
    assert not any(tuple(ids[i:i + len(b)]) == b for b in banned for i in range(len(ids)))
