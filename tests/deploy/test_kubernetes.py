"""Kubernetes manifests: schema validation (built-in kinds with kubernetes-validate --strict, custom resources
against their published CRD schemas), the rendered overlays, and the properties issue 7 asks for."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from deploy_helpers import DEPLOY, K8S, KUSTOMIZATIONS, ROOT, SCHEMAS, manifest_files, of_kind, one

kv = pytest.importorskip("kubernetes_validate.utils", reason="kubernetes-validate is in the test extra")
jsonschema = pytest.importorskip("jsonschema")

# Custom resources we use -> their vendored CRD schema (tests/deploy/schemas/SOURCES.md).
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-v1alpha1.json",
}
# KEDA's prometheus scaler reads these trigger metadata keys (kedacore/keda pkg/scalers/prometheus_scaler.go).
KEDA_PROMETHEUS_KEYS = {"serverAddress", "query", "queryParameters", "threshold", "activationThreshold", "namespace",
                        "customHeaders", "ignoreNullValues", "unsafeSsl", "awsRegion", "timeout", "identityOwner"}
KEDA_METRIC_TYPES = {"AverageValue", "Value", "Utilization"}


def kubernetes_validate_cli() -> list[str]:
    exe = Path(sys.executable).with_name("kubernetes-validate")
    if exe.exists():
        return [str(exe)]
    if shutil.which("kubernetes-validate"):
        return ["kubernetes-validate"]
    return [sys.executable, "-m", "kubernetes_validate"]


def test_every_raw_manifest_validates_strictly():
    files = manifest_files()
    assert len(files) >= 8, files
    proc = subprocess.run([*kubernetes_validate_cli(), "--strict", "--quiet", *map(str, files)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Built-in kinds must not fall through to "no schema" warnings; only our custom resources may.
    warned = [line for line in proc.stdout.splitlines() if line.startswith("WARN")]
    assert all(any(kind in line for _, kind in CRD_SCHEMAS) for line in warned), warned


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_rendered_output_validates_strictly(rendered, name, tmp_path):
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump_all(rendered[name]))
    proc = subprocess.run([*kubernetes_validate_cli(), "--strict", "--quiet", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for res in rendered[name]:
        if (res["apiVersion"], res["kind"]) not in CRD_SCHEMAS:
            # the same check through the library, to fail loudly on a missing schema for a built-in kind
            kv.validate(res, kv.latest_version(), strict=True)


def _strict(schema: dict) -> dict:
    """The CRD schema with unknown fields rejected, as the API server prunes (and kubectl warns about) them."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.get("x-kubernetes-int-or-string"):
                node.pop("type", None)
                node.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return schema


def _custom_resources() -> list[tuple[str, dict]]:
    found = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
                found.append((str(path.relative_to(ROOT)), doc))
    return found


def test_custom_resources_match_their_published_schemas(rendered):
    crs = _custom_resources()
    for name in KUSTOMIZATIONS:
        crs += [(name, r) for r in rendered[name] if (r["apiVersion"], r["kind"]) in CRD_SCHEMAS]
    kinds = {doc["kind"] for _, doc in crs}
    assert kinds == {k for _, k in CRD_SCHEMAS}, kinds
    for where, doc in crs:
        schema = json.loads((SCHEMAS / CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])]).read_text())
        src = schema.pop("x-source")
        assert f"{src['group']}/{src['version']}" == doc["apiVersion"] and src["kind"] == doc["kind"]
        body = {k: v for k, v in doc.items() if k != "metadata"}
        errors = sorted(jsonschema.Draft7Validator(_strict(schema)).iter_errors(body), key=str)
        assert not errors, f"{where} {doc['kind']}: " + "; ".join(
            f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5])
        # metadata is plain ObjectMeta: validate it with the built-in schema of a ConfigMap's metadata
        kv.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}, kv.latest_version(), True)


def test_keda_triggers_use_known_prometheus_fields():
    scaled = [doc for _, doc in _custom_resources() if doc["kind"] == "ScaledObject"]
    assert scaled
    for so in scaled:
        for trig in so["spec"]["triggers"]:
            assert trig["type"] == "prometheus"
            assert set(trig["metadata"]) <= KEDA_PROMETHEUS_KEYS, set(trig["metadata"]) - KEDA_PROMETHEUS_KEYS
            assert {"serverAddress", "query", "threshold"} <= set(trig["metadata"])
            float(trig["metadata"]["threshold"])
            assert all(isinstance(v, str) for v in trig["metadata"].values()), "trigger metadata values are strings"
            assert trig.get("metricType", "AverageValue") in KEDA_METRIC_TYPES


def _pod_spec(resources) -> dict:
    return one(resources, "Deployment")["spec"]["template"]["spec"]


def _container(resources) -> dict:
    (c,) = _pod_spec(resources)["containers"]
    return c


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_deployment_probes_security_and_volumes(rendered, name):
    res = rendered[name]
    dep = one(res, "Deployment")
    spec, c = _pod_spec(res), _container(res)
    assert "replicas" not in dep["spec"], "the autoscaler owns the replica count"
    # Probes on /health, with a startup window long enough for model load.
    port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in port_names, probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    live = c["livenessProbe"]
    env = _config_env(res)
    drain = float(env.get("PACKSERVE_SHUTDOWN_TIMEOUT", 30))
    assert live["periodSeconds"] * live["failureThreshold"] >= drain, "liveness must outlast a graceful drain"
    assert spec["terminationGracePeriodSeconds"] > drain + 5
    # Non-root, no privilege escalation, all capabilities dropped.
    psc, csc = spec["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] and psc["runAsUser"] > 0 and psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"]
    assert csc["readOnlyRootFilesystem"] is True
    # Service links would inject PACKSERVE_PORT=tcp://... from the `packserve` Service.
    assert spec["enableServiceLinks"] is False
    assert spec["automountServiceAccountToken"] is False
    # /dev/shm in memory; the model from a PVC, read-only, at /models.
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    models = volumes[mounts["/models"]["name"]]
    assert mounts["/models"]["readOnly"] and models["persistentVolumeClaim"]["readOnly"]
    pvc_names = {p["metadata"]["name"] for p in of_kind(res, "PersistentVolumeClaim")}
    assert models["persistentVolumeClaim"]["claimName"] in pvc_names
    assert env["PACKSERVE_MODEL"].startswith("/models/")
    # With a read-only root, everything the server writes needs a volume.
    assert {"/tmp", "/home/packserve/.cache"} <= set(mounts)
    # The API key comes from a Secret, never from the ConfigMap.
    (key,) = [e for e in c["env"] if e["name"] == "PACKSERVE_API_KEY"]
    assert "secretKeyRef" in key["valueFrom"] and "PACKSERVE_API_KEY" not in env
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    # The port the server listens on is the port the probes and the Service use.
    assert port_names["http"] == int(env["PACKSERVE_PORT"]) and env["PACKSERVE_HOST"] == "0.0.0.0"


def _config_env(resources) -> dict[str, str]:
    c = _container(resources)
    env = {}
    cms = {cm["metadata"]["name"]: cm for cm in of_kind(resources, "ConfigMap")}
    for src in c.get("envFrom", []):
        env.update(cms[src["configMapRef"]["name"]]["data"])
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
    return env


@pytest.mark.parametrize("name", ["overlays/gpu", "overlays/gpu-keda"])
def test_gpu_overlay_requests_a_gpu(rendered, name):
    res = rendered[name]
    c, spec = _container(res), _pod_spec(res)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert _config_env(res)["PACKSERVE_DEVICE"] == "cuda"
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"] == "8Gi", "the overlay's shm size merges into base"
    assert "nvidia.com/gpu" not in _container(rendered["base"])["resources"].get("limits", {})


def test_service_pdb_monitor_and_autoscalers_point_at_the_deployment(rendered):
    for name in KUSTOMIZATIONS:
        res = rendered[name]
        dep = one(res, "Deployment")
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        svc = one(res, "Service")
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        pdb = one(res, "PodDisruptionBudget")
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        ports = {p["name"] for p in svc["spec"]["ports"]}
        for sm in of_kind(res, "ServiceMonitor"):
            assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
            assert all(ep["port"] in ports and ep["path"] == "/metrics" for ep in sm["spec"]["endpoints"])
        hpas, scaled = of_kind(res, "HorizontalPodAutoscaler"), of_kind(res, "ScaledObject")
        assert len(hpas) + len(scaled) == 1, "exactly one autoscaler per Deployment"
        for a in hpas + scaled:
            ref = a["spec"]["scaleTargetRef"]
            assert ref["name"] == dep["metadata"]["name"] and ref.get("kind", "Deployment") == "Deployment"
        for hpa in hpas:
            names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
            assert "packserve:num_requests_waiting" in names, "scale on queue length"
        for so in scaled:
            assert any("packserve:num_requests_waiting" in t["metadata"]["query"] for t in so["spec"]["triggers"])
    assert of_kind(rendered["overlays/gpu-keda"], "ScaledObject") and of_kind(rendered["overlays/gpu"], "ServiceMonitor")


def test_prometheusrule_matches_the_compose_alert_rules():
    compose_rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    rule = yaml.safe_load((K8S / "components" / "monitoring" / "prometheusrule.yaml").read_text())
    assert rule["spec"]["groups"] == compose_rules, "edit deploy/prometheus/alerts.yml and the PrometheusRule together"


def test_alert_rules_are_well_formed():
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    names = [r["alert"] for g in groups for r in g["rules"]]
    assert len(names) == len(set(names)) >= 5
    for g in groups:
        for r in g["rules"]:
            assert set(r) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, r["alert"]
            assert r["labels"]["severity"] in {"critical", "warning", "info"}
            assert {"summary", "description"} <= set(r["annotations"])
            assert r["expr"].count("(") == r["expr"].count(")"), r["alert"]


def test_strict_crd_schemas_reject_typos():
    """The CRD check is not vacuous: a misspelt field fails it."""
    doc = yaml.safe_load((K8S / "components" / "monitoring" / "servicemonitor.yaml").read_text())
    doc["spec"]["endpoints"][0]["scrapeIntervall"] = "15s"
    schema = json.loads((SCHEMAS / "servicemonitor-v1.json").read_text())
    schema.pop("x-source")
    body = {k: v for k, v in doc.items() if k != "metadata"}
    assert list(jsonschema.Draft7Validator(_strict(schema)).iter_errors(body))


def test_every_yaml_file_is_used():
    """Each YAML under deploy/kubernetes is a kustomization, a patch or a resource some kustomization lists."""
    listed = set()
    for kfile in K8S.rglob("kustomization.yaml"):
        k = yaml.safe_load(kfile.read_text())
        for entry in k.get("resources", []) + k.get("components", []):
            listed.add((kfile.parent / entry).resolve())
    from deploy_helpers import patch_files

    used = listed | patch_files()
    for path in K8S.rglob("*.yaml"):
        if path.name != "kustomization.yaml":
            assert path.resolve() in used, f"{path.relative_to(ROOT)} is not referenced by any kustomization"


def test_tensor_parallel_overlay_gives_each_replica_its_gpus(rendered):
    """overlays/gpu-tp: every GPU of the replica is a rank (the GPU count equals the tensor-parallel size), with a
    larger /dev/shm for NCCL."""
    res = rendered["overlays/gpu-tp"]
    c, spec = _container(res), _pod_spec(res)
    n = _config_env(res)["PACKSERVE_TENSOR_PARALLEL_SIZE"]
    assert int(n) > 1 and c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == n
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")["emptyDir"]
    assert shm["medium"] == "Memory" and int(shm["sizeLimit"].removesuffix("Gi")) >= 4 * int(n)


def test_multi_host_pair_is_wired_like_torchrun():
    """deploy/kubernetes/multi-host: the leader is rank 0 and the only HTTP endpoint, the workers are ranks 1.. (pod
    index + 1), all agree on WORLD_SIZE, the tensor-parallel size and MASTER_ADDR (the leader's stable DNS name),
    and no two ranks share a node."""
    docs = [d for p in sorted((K8S / "multi-host").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    sets = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in of_kind(docs, "StatefulSet")}
    leader, worker = sets["leader"], sets["worker"]

    def env(sts):
        (c,) = sts["spec"]["template"]["spec"]["containers"]
        return {e["name"]: e.get("value") for e in c["env"]}, c

    le, lc = env(leader)
    we, wc = env(worker)
    world = int(le["WORLD_SIZE"])
    assert le["RANK"] == "0" and we["WORLD_SIZE"] == le["WORLD_SIZE"]
    assert le["PACKSERVE_TENSOR_PARALLEL_SIZE"] == we["PACKSERVE_TENSOR_PARALLEL_SIZE"] == str(world)
    assert world == 1 + worker["spec"]["replicas"] and leader["spec"]["replicas"] == 1
    assert "RANK=$((POD_INDEX + 1))" in " ".join(wc["command"]) and "RANK" not in we
    headless = next(s for s in of_kind(docs, "Service") if s["spec"].get("clusterIP") == "None")
    assert le["MASTER_ADDR"] == we["MASTER_ADDR"] == f"{leader['metadata']['name']}-0.{headless['metadata']['name']}"
    assert leader["spec"]["serviceName"] == headless["metadata"]["name"]
    assert any(p["containerPort"] == int(le["MASTER_PORT"]) for p in lc["ports"])
    http = [s for s in of_kind(docs, "Service") if s["spec"].get("clusterIP") != "None"]
    assert all(s["spec"]["selector"]["app.kubernetes.io/component"] == "leader" for s in http + [headless])
    for sts in (leader, worker):
        (c,) = sts["spec"]["template"]["spec"]["containers"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        anti = sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        assert anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == "kubernetes.io/hostname"
    assert "startupProbe" in lc and "readinessProbe" in lc and "readinessProbe" not in wc
