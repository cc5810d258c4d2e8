"""compose.yaml (against the Compose Specification schema), Prometheus' configuration, Grafana's provisioning and
the dashboard."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from deploy_helpers import DEPLOY, SCHEMAS

jsonschema = pytest.importorskip("jsonschema")

COMPOSE = DEPLOY / "compose.yaml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR}, with the variables unset."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


def test_compose_matches_the_compose_specification(compose):
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=str)
    assert not errors, "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5])


def test_compose_packserve_service(compose):
    svc = compose["services"]["packserve"]
    assert (COMPOSE.parent / svc["build"]["context"] / svc["build"].get("dockerfile", "Dockerfile")).is_file()
    (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert any(v.endswith(":/models:ro") for v in svc["volumes"])
    assert "shm_size" in svc
    grace = float(svc["stop_grace_period"].rstrip("s"))
    assert grace > float(svc["environment"].get("PACKSERVE_SHUTDOWN_TIMEOUT", 30))
    # The image sets PACKSERVE_HOST=0.0.0.0 and port 8000; the published port must match.
    assert any(p.split(":")[-1] == "8000" for p in svc["ports"])


def test_compose_bind_mounts_exist(compose):
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            src = _interpolate(vol).split(":")[0]
            if src.startswith((".", "/")):
                assert (COMPOSE.parent / src).exists(), f"{name}: bind source {src} missing"
            else:
                assert src in compose.get("volumes", {}), f"{name}: named volume {src} not declared"


def test_prometheus_scrapes_packserve_and_loads_the_alerts(compose):
    prom = compose["services"]["prometheus"]
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prom["volumes"]}
    assert (COMPOSE.parent / mounts["/etc/prometheus/prometheus.yml"]).resolve() == \
        (DEPLOY / "prometheus" / "prometheus.yml").resolve()
    for rule_file in cfg["rule_files"]:
        assert rule_file in mounts and (COMPOSE.parent / mounts[rule_file]).is_file()
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "packserve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert "packserve:8000" in targets, "scrape the compose service by name on the image's port"
    assert re.search(r'job="packserve"', (DEPLOY / "prometheus" / "alerts.yml").read_text())
    assert all(":" in img and not img.endswith(":latest")
               for img in (s.get("image", "") for s in compose["services"].values()))


def test_grafana_provisioning(compose):
    graf = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: (COMPOSE.parent / v.split(":")[0]).resolve() for v in graf["volumes"]
              if v.startswith(".")}
    prov = mounts["/etc/grafana/provisioning"]
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((prov / "dashboards" / "packserve.yml").read_text())["providers"]
    dash_dir = mounts[provider["options"]["path"]]
    assert list(dash_dir.glob("*.json")), "the provider's folder holds the dashboards"
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dash_dir / Path(home).name).is_file()


def test_dashboard_structure():
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "packserve.json").read_text())
    assert dash["uid"] and dash["title"]
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert "datasource" in variables
    text = json.dumps(dash)
    for needed in ("time_to_first_token_seconds_bucket", "time_per_output_token_seconds_bucket",
                   "num_requests_waiting", "kv_cache_usage_perc", "prefill_packing_efficiency",
                   "generation_tokens_total", "request_success_total"):
        assert f"packserve:{needed}" in text, needed
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), (p["title"], t["expr"])
            # $variables used in a query are defined
            for var in re.findall(r"\$(\w+)", t["expr"]):
                assert var in variables or var.startswith("__"), (p["title"], var)
        # Percentiles come from histograms: a quantile over anything but _bucket series is a mistake.
        for t in p["targets"]:
            for q in re.findall(r"histogram_quantile\([^,]+,(.*)", t["expr"]):
                assert "_bucket" in q, t["expr"]
    grid = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in panels]
    assert len(grid) == len(set(grid)), "panels overlap"
