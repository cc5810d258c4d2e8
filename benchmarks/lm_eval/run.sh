#!/usr/bin/env bash
# lm-eval's local-completions against `packserve serve` (the demo model), offline, with lm-eval's default tokenizer
# settings: it finds /tokenizer_info and tokenizes through /tokenize (no Hugging Face hub). Two local tasks: a
# loglikelihood multiple choice (echo + logprobs scoring) and a greedy generate_until.
#   python -m venv /tmp/lmeval && /tmp/lmeval/bin/pip install torch==2.13.0 "lm-eval[api]"
#   LM_EVAL=/tmp/lmeval/bin/lm_eval bash benchmarks/lm_eval/run.sh
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
LM_EVAL=${LM_EVAL:-lm_eval}
PORT=${PORT:-8790}
WORK=$(mktemp -d)
trap 'kill $SERVER 2>/dev/null; rm -rf "$WORK"' EXIT
python3 - "$WORK" <<'PY'
import json, random, sys
rng, out = random.Random(0), sys.argv[1]
with open(f"{out}/mc.jsonl", "w") as f:
    for _ in range(20):
        a, b = rng.randrange(10), rng.randrange(10)
        f.write(json.dumps({"question": f"What is {a} plus {b}?", "answer": 0,
                            "choices": [str(a + b), str(a + b + 1), str(abs(a - b) + 2), "café 日本語"]}) + "\n")
with open(f"{out}/gen.jsonl", "w") as f:
    for i in range(10):
        f.write(json.dumps({"question": f"Say the number {i}.", "answer": str(i)}) + "\n")
PY
for t in mc gen; do sed "s#LMEVAL_DATA/#$WORK/#" "$HERE/packserve_$t.yaml" > "$WORK/packserve_$t.yaml"; done
packserve serve --port "$PORT" > "$WORK/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 1; done
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "$LM_EVAL" --model local-completions \
  --model_args "model=packserve-demo,base_url=http://127.0.0.1:$PORT/v1/completions,num_concurrent=4,max_retries=1" \
  --tasks packserve_mc,packserve_gen --include_path "$WORK"
echo "requests that were not 200: $(grep 'HTTP/1.1' "$WORK/server.log" | grep -vc ' 200 ' || true)"
