"""Helpers for the deploy checks: Dockerfile parsing, kustomize rendering, the PromQL used anywhere in deploy/.

Everything here runs offline on CPU: no container engine, no cluster. `kubectl kustomize` renders the overlays.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is in the test extra")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
KUSTOMIZATIONS = ("base", "overlays/gpu", "overlays/gpu-keda", "overlays/gpu-tp")

# A metric name as written in PromQL / exposition text (colons allowed: the `packserve:` prefix).
METRIC_RE = re.compile(r"(?<![A-Za-z0-9_:])packserve:[A-Za-z_][A-Za-z0-9_:]*")


# -- Dockerfile -------------------------------------------------------------------------------------------------
@dataclass
class Instruction:
    cmd: str  # upper case: FROM, RUN, ...
    args: str  # continuation lines joined
    line: int
    comments: list[str]  # the comment lines right above it


def parse_dockerfile(path: Path = ROOT / "Dockerfile") -> list[Instruction]:
    out: list[Instruction] = []
    comments: list[str] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        raw = lines[i].strip()
        start = i + 1
        i += 1
        if not raw:
            comments = []
            continue
        if raw.startswith("#"):
            comments.append(raw[1:].strip())
            continue
        parts = [raw]
        while parts[-1].endswith("\\") and i < len(lines):
            parts[-1] = parts[-1][:-1].rstrip()
            nxt = lines[i].strip()
            i += 1
            if nxt.startswith("#"):  # comments inside a continued instruction are dropped by Docker
                continue
            parts.append(nxt)
        text = " ".join(p for p in parts if p)
        cmd, _, args = text.partition(" ")
        out.append(Instruction(cmd.upper(), args.strip(), start, comments))
        comments = []
    return out


def stages(instrs: list[Instruction]) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for ins in instrs:
        if ins.cmd == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def arg_defaults(instrs: list[Instruction]) -> dict[str, str]:
    """ARG name=default, global and per stage (names are unique in our Dockerfile)."""
    out = {}
    for ins in instrs:
        if ins.cmd == "ARG" and "=" in ins.args:
            k, _, v = ins.args.partition("=")
            out[k.strip()] = v.strip().strip('"')
    return out


def expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def env_pairs(args: str) -> dict[str, str]:
    """ENV k=v k2=v2 (or the legacy `ENV k v`)."""
    tokens = shlex.split(args)
    if tokens and "=" not in tokens[0]:
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(t.split("=", 1) for t in tokens)


def shell_commands(run_args: str) -> list[list[str]]:
    """A RUN's shell form split into simple commands at && ; and |."""
    tokens = shlex.split(run_args, posix=True)
    cmds, cur = [], []
    for t in tokens:
        if t in ("&&", "||", ";", "|"):
            if cur:
                cmds.append(cur)
            cur = []
        else:
            cur.append(t)
    if cur:
        cmds.append(cur)
    return cmds


def pip_installs(instrs: list[Instruction]) -> list[list[str]]:
    """Arguments of every `pip install` in RUN instructions, ARGs expanded."""
    values = arg_defaults(instrs)
    found = []
    for ins in instrs:
        if ins.cmd != "RUN":
            continue
        for cmd in shell_commands(expand(ins.args, values)):
            if len(cmd) >= 2 and Path(cmd[0]).name in ("pip", "pip3") and cmd[1] == "install":
                found.append(cmd[2:])
            elif cmd[:4] == ["python", "-m", "pip", "install"] or cmd[:4] == ["python3", "-m", "pip", "install"]:
                found.append(cmd[4:])
    return found


# -- kustomize --------------------------------------------------------------------------------------------------
def kustomize_command() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def render_all() -> dict[str, list[dict]]:
    """{kustomization: [resources]} for every entry of KUSTOMIZATIONS, as `kubectl kustomize` renders them."""
    cmd = kustomize_command()
    if cmd is None:
        pytest.skip("neither `kubectl` nor `kustomize` is on PATH: cannot render the kustomize overlays")
    out = {}
    for name in KUSTOMIZATIONS:
        proc = subprocess.run([*cmd, str(K8S / name)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"kustomize {name} failed:\n{proc.stderr}"
        out[name] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


def of_kind(resources: list[dict], kind: str) -> list[dict]:
    return [r for r in resources if r.get("kind") == kind]


def one(resources: list[dict], kind: str) -> dict:
    found = of_kind(resources, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def patch_files() -> set[Path]:
    """Files that kustomizations use as patches: partial objects, validated only as part of the rendered output."""
    found = set()
    for kfile in K8S.rglob("kustomization.yaml"):
        for patch in yaml.safe_load(kfile.read_text()).get("patches", []):
            if "path" in patch:
                found.add((kfile.parent / patch["path"]).resolve())
    return found


def manifest_files() -> list[Path]:
    """Every complete Kubernetes object under deploy/kubernetes (kustomization files and patches excluded)."""
    files = []
    patches = patch_files()
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or path.resolve() in patches:
            continue
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        if docs and all("apiVersion" in d and "kind" in d for d in docs):
            files.append(path)
    return files


# -- metric names used by dashboards, autoscalers and alerts ----------------------------------------------------
def _dashboard_queries(node) -> list[str]:
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("expr", "definition") and isinstance(v, str):
                found.append(v)
            elif k == "query" and isinstance(v, str):
                found.append(v)
            else:
                found.extend(_dashboard_queries(v))
    elif isinstance(node, list):
        for v in node:
            found.extend(_dashboard_queries(v))
    return found


def metric_queries() -> dict[str, list[str]]:
    """{source: [PromQL expressions or metric names]} for every place that names packserve metrics."""
    out: dict[str, list[str]] = {}
    for dash in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        out[str(dash.relative_to(ROOT))] = _dashboard_queries(json.loads(dash.read_text()))
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    out["deploy/prometheus/alerts.yml"] = [r["expr"] for g in alerts["groups"] for r in g["rules"]]
    adapter = yaml.safe_load((DEPLOY / "prometheus" / "adapter-values.yaml").read_text())
    out["deploy/prometheus/adapter-values.yaml"] = [r["seriesQuery"] for r in adapter["rules"]["custom"]]
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            rel = str(path.relative_to(ROOT))
            if doc["kind"] == "HorizontalPodAutoscaler":
                out.setdefault(rel, []).extend(
                    m[m["type"].lower()]["metric"]["name"] for m in doc["spec"]["metrics"] if m["type"] != "Resource")
            elif doc["kind"] == "ScaledObject":
                out.setdefault(rel, []).extend(t["metadata"]["query"] for t in doc["spec"]["triggers"]
                                               if t["type"] == "prometheus")
            elif doc["kind"] == "PrometheusRule":
                out.setdefault(rel, []).extend(r["expr"] for g in doc["spec"]["groups"] for r in g["rules"])
    return out


def metric_names(queries: dict[str, list[str]]) -> dict[str, set[str]]:
    """{metric name: {sources using it}}."""
    names: dict[str, set[str]] = {}
    for source, exprs in queries.items():
        for expr in exprs:
            for name in METRIC_RE.findall(expr):
                names.setdefault(name, set()).add(source)
    return names


# Labels Prometheus adds to every scraped series (static configs, ServiceMonitor target labels), plus `le`.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint", "le"}


def label_names(expr: str) -> set[str]:
    """Label names an expression filters or groups on (matchers inside {...}, by/without (...))."""
    labels = set()
    for body in re.findall(r"\{([^{}]*)\}", expr):
        labels.update(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", body))
    for body in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels.update(x.strip() for x in body.split(",") if x.strip())
    # label_values(metric, label) in Grafana variables
    for m in re.findall(r"label_values\([^,]*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)", expr):
        labels.add(m)
    labels.discard("__name__")
    return labels
