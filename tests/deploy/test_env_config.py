"""Every PACKSERVE_* variable the Dockerfile, compose.yaml and the Kubernetes manifests set is an option the
server accepts (serve/envs.py, the registry `packserve serve` builds its flags from), with a value it parses."""

from __future__ import annotations

import re

import yaml
from deploy_helpers import DEPLOY, K8S, env_pairs, manifest_files, of_kind, parse_dockerfile

from packserve import envs


def _dockerfile_env() -> dict[str, str]:
    out = {}
    for ins in parse_dockerfile():
        if ins.cmd in ("ENV", "ARG") and "PACKSERVE_" in ins.args:
            out.update(env_pairs(ins.args) if ins.cmd == "ENV" else {ins.args.split("=")[0]: ins.args.split("=", 1)[1]})
    return out


def _compose_env() -> dict[str, str]:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    out = {}
    for svc in compose["services"].values():
        env = svc.get("environment", {})
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        for k, v in env.items():
            # ${VAR:-default} with VAR unset
            out[k] = re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", str(v))
    return out


def _kubernetes_env(rendered) -> dict[str, str | None]:
    """Values of container env entries and of the ConfigMaps they load; None for values from Secrets."""
    out: dict[str, str | None] = {}
    for resources in rendered.values():
        for cm in of_kind(resources, "ConfigMap"):
            out.update(cm.get("data", {}))
        for dep in of_kind(resources, "Deployment"):
            for c in dep["spec"]["template"]["spec"]["containers"]:
                for e in c.get("env", []):
                    out[e["name"]] = e.get("value")
    for kv in K8S.rglob("*.env"):
        for line in kv.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                k, _, v = line.partition("=")
                out[k.strip()] = v.strip()
    for path in manifest_files():  # raw files too (a Deployment env outside any kustomization)
        for doc in yaml.safe_load_all(path.read_text()):
            for c in (doc or {}).get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                for e in c.get("env", []):
                    out.setdefault(e["name"], e.get("value"))
    return out


def test_every_packserve_variable_is_a_server_option(rendered):
    accepted = {v.env: v for v in envs.options()}
    sources = {"Dockerfile": _dockerfile_env(), "deploy/compose.yaml": _compose_env(),
               "deploy/kubernetes": _kubernetes_env(rendered)}
    seen = 0
    for where, env in sources.items():
        for name, value in env.items():
            if not name.startswith(envs.PREFIX):
                continue
            seen += 1
            assert name in accepted, f"{where} sets {name}, which `packserve serve` does not accept"
            if value not in (None, ""):  # "" means the default to envs.get
                accepted[name].parse(value)  # raises EnvError on a bad value (e.g. a choice that does not exist)
    assert seen >= 10
    # The names the deployment relies on are all there.
    for needed in ("PACKSERVE_HOST", "PACKSERVE_PORT", "PACKSERVE_MODEL", "PACKSERVE_API_KEY"):
        assert needed in accepted


def test_no_stray_packserve_names_in_deploy_files():
    """Any PACKSERVE_* word in deploy/, the Dockerfile or the README's Deployment section names a real variable."""
    known = {v.env for v in envs.REGISTRY.values()}
    texts = {p: p.read_text() for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".md",
                                                                                            ".env", ".json")}
    root = DEPLOY.parent
    texts[root / "Dockerfile"] = (root / "Dockerfile").read_text()
    readme = (root / "README.md").read_text()
    texts[root / "README.md"] = readme.split("## Deployment", 1)[1].split("\n## ", 1)[0] if "## Deployment" in readme else ""
    for path, text in texts.items():
        for name in set(re.findall(r"\bPACKSERVE_[A-Z0-9_]+\b", text)):
            assert name in known, f"{path.relative_to(root)} mentions {name}, which serve/envs.py does not define"
