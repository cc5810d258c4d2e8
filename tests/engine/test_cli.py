import json
import subprocess
import sys

from packserve import LLM, SamplingParams


def test_generate_cli_matches_offline_api(checkpoint_factory):
    path = checkpoint_factory("llama")
    proc = subprocess.run([sys.executable, "-m", "packserve", "generate", "--model", path, "--prompt", "Hello",
                           "--prompt", "The capital of France", "--max-tokens", "8", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    ref = LLM(path).generate(["Hello", "The capital of France"], SamplingParams(max_tokens=8, temperature=0))
    assert [x["token_ids"] for x in lines] == [o.outputs[0].token_ids for o in ref]


def test_generate_cli_reports_bad_input(checkpoint_factory):
    proc = subprocess.run([sys.executable, "-m", "packserve", "generate", "--model", checkpoint_factory("llama"),
                           "--prompt", "x", "--max-tokens", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "max_tokens" in proc.stderr


def test_kernels_namespace_does_not_shadow_hub_package():
    """`packserve.kernels` is our folder; a bare `import kernels` must not find it (transformers probes for
    Hugging Face's `kernels`)."""
    import importlib.util

    import packserve.kernels

    assert packserve.kernels.__path__[0].endswith("kernels")
    spec = importlib.util.find_spec("kernels")
    assert spec is None or "packserve" not in str(spec.origin)
    assert spec is None or not str(spec.origin).startswith(str(__import__("pathlib").Path(
        packserve.kernels.__path__[0])))
