"""Kubernetes and KServe manifests under deploy/, checked statically: the core kinds against the
Kubernetes OpenAPI schemas that kubernetes-validate ships (offline, strict: unknown fields fail),
the KServe predictor's pod fields against the core Pod schema, and the contract between the
pieces (GPU, probes on our endpoints, read-only model repository, HPA and Service wired to the
Deployment, RESNET_SERVE_* variables that service.core.settings.Settings knows)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import ROOT

DEPLOY = ROOT / "deploy"
MANIFESTS = sorted(DEPLOY.rglob("*.yaml"))
ENV_PREFIX = "RESNET_SERVE_"
# Fields that KServe's ComponentExtensionSpec adds to a predictor; the rest is a core PodSpec.
KSERVE_COMPONENT_FIELDS = {
    "minReplicas",
    "maxReplicas",
    "scaleTarget",
    "scaleMetric",
    "containerConcurrency",
    "timeout",
    "canaryTrafficPercent",
    "logger",
    "batcher",
    "labels",
    "annotations",
    "deploymentStrategy",
}


def load(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in MANIFESTS:
        for doc in load(path):
            yield path, doc


def one(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in documents() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "InferenceService":
        return doc["spec"]["predictor"]
    return doc["spec"]["template"]["spec"]


def serving_container(doc: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_spec(doc)["containers"]
    return container


def servers() -> list[dict[str, Any]]:
    return [one("Deployment"), one("InferenceService")]


def kubernetes_versions() -> list[str]:
    """The oldest and newest Kubernetes releases whose schemas the installed package ships."""
    utils = pytest.importorskip(
        "kubernetes_validate.utils",
        reason="kubernetes-validate (a dev dependency) is not installed",
    )
    versions = utils.all_versions()
    return sorted({versions[0], versions[-1]})


def validate(doc: dict[str, Any]) -> None:
    import kubernetes_validate

    for version in kubernetes_versions():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']} (k8s {version}): {where}: {exc}")


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        assert port in [p["containerPort"] for p in container["ports"]]
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return number


def test_manifests_exist_and_are_namespace_agnostic() -> None:
    kinds = sorted(doc["kind"] for _, doc in documents())
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "InferenceService",
        "Job",
        "PersistentVolumeClaim",
        "Service",
    ]
    for path, doc in documents():
        body = "data" if doc["kind"] == "ConfigMap" else "spec"
        assert {"apiVersion", "kind", "metadata", body} <= doc.keys(), path
        assert doc["metadata"]["name"].startswith("resnet-serve"), path
        assert "namespace" not in doc["metadata"], f"{path}: pick the namespace with kubectl -n"


@pytest.mark.parametrize(
    "doc",
    [doc for _, doc in documents() if doc["kind"] != "InferenceService"],
    ids=lambda doc: doc["kind"],
)
def test_core_manifests_match_the_kubernetes_schemas(doc: dict[str, Any]) -> None:
    validate(doc)


def test_inference_service_predictor_is_a_valid_pod() -> None:
    """The InferenceService CRD has no schema in kubernetes-validate; its predictor is a PodSpec
    plus KServe's component fields, so check its pod part as a core Pod."""
    isvc = one("InferenceService")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    predictor = isvc["spec"]["predictor"]
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    container = serving_container(isvc)
    assert container["name"] == "kserve-container"  # how KServe finds the predictor container
    assert container["image"]
    pod = {k: v for k, v in predictor.items() if k not in KSERVE_COMPONENT_FIELDS}
    validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": pod})


@pytest.mark.parametrize("doc", servers(), ids=lambda doc: doc["kind"])
def test_servers_request_one_gpu(doc: dict[str, Any]) -> None:
    resources = serving_container(doc)["resources"]
    assert str(resources["limits"]["nvidia.com/gpu"]) == "1"
    # Extended resources cannot be overcommitted: a request, if given, equals the limit.
    assert str(resources["requests"].get("nvidia.com/gpu", 1)) == "1"
    assert resources["requests"]["cpu"] and resources["limits"]["memory"]


@pytest.mark.parametrize("doc", servers(), ids=lambda doc: doc["kind"])
def test_probes_use_our_endpoints(doc: dict[str, Any]) -> None:
    container = serving_container(doc)
    env = {e["name"]: e.get("value") for e in container["env"]}
    port = int(env[ENV_PREFIX + "PORT"])
    expected = {"readinessProbe": "/readyz", "livenessProbe": "/healthz", "startupProbe": "/readyz"}
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert container_port(container, get["port"]) == port, probe
    startup = container["startupProbe"]
    # Loading and warming the paper set takes minutes: liveness must not kill it meanwhile.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    grace = pod_spec(doc)["terminationGracePeriodSeconds"]
    drain_s = int(env.get(ENV_PREFIX + "DRAIN_DELAY_MS") or 0) / 1000
    timeout_s = int(env.get(ENV_PREFIX + "REQUEST_TIMEOUT_MS") or 30_000) / 1000
    assert grace > drain_s + timeout_s, "accepted requests must be able to finish on SIGTERM"


@pytest.mark.parametrize("doc", [*servers(), one("Job")], ids=lambda doc: doc["kind"])
def test_model_repository_volume(doc: dict[str, Any]) -> None:
    """Servers mount the PVC read-only where RESNET_SERVE_MODEL_REPOSITORY points; the export
    Job mounts the same claim writable."""
    claim = one("PersistentVolumeClaim")["metadata"]["name"]
    spec = pod_spec(doc)
    (container,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    (mount,) = [
        m
        for m in container["volumeMounts"]
        if volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName") == claim
    ]
    assert env[ENV_PREFIX + "MODEL_REPOSITORY"] == mount["mountPath"]
    read_only = doc["kind"] != "Job"
    assert mount.get("readOnly", False) is read_only
    assert volumes[mount["name"]]["persistentVolumeClaim"].get("readOnly", False) is read_only


@pytest.mark.parametrize("doc", [*servers(), one("Job")], ids=lambda doc: doc["kind"])
def test_runs_as_non_root(doc: dict[str, Any]) -> None:
    spec = pod_spec(doc)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] > 0
    for container in spec["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]


def test_hpa_scales_the_deployment() -> None:
    hpa, deployment = one("HorizontalPodAutoscaler"), one("Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == (deployment["apiVersion"], "Deployment")
    assert target["name"] == deployment["metadata"]["name"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pods, cpu = hpa["spec"]["metrics"]
    assert pods["type"] == "Pods" and pods["pods"]["target"]["type"] == "AverageValue"
    assert cpu["resource"]["name"] == "cpu"
    # Utilization is relative to the request, so the container must make one.
    assert serving_container(deployment)["resources"]["requests"]["cpu"]


def test_hpa_custom_metric_is_served_by_a_prometheus_adapter_rule_on_a_real_metric() -> None:
    """The HPA's Pods metric is one the service exports (service/metrics.py), and the
    prometheus-adapter rule serves it per pod under that name."""
    from service.core.metrics import Metrics

    exported = {m.name for m in Metrics().registry.collect()}
    (pods,) = [m for m in one("HorizontalPodAutoscaler")["spec"]["metrics"] if m["type"] == "Pods"]
    wanted = pods["pods"]["metric"]["name"]
    assert wanted in exported
    rules = yaml.safe_load(one("ConfigMap")["data"]["config.yaml"])["rules"]
    served = {rule["name"]["as"]: rule for rule in rules}
    assert wanted in served
    rule = served[wanted]
    assert rule["seriesQuery"].startswith(wanted + "{")
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert "by (<<.GroupBy>>)" in rule["metricsQuery"]
    assert set(served) <= exported


def test_the_inference_service_exposes_grpc_beside_http() -> None:
    ports = serving_container(one("InferenceService"))["ports"]
    assert [(p["name"], p["containerPort"]) for p in ports] == [("http1", 8000), ("grpc", 8001)]


def test_the_export_job_reads_representative_images_from_its_calibration_volume() -> None:
    job = one("Job")
    (container,) = pod_spec(job)["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["calibration"]["readOnly"] is True
    # relative to the image's working directory, /app (the Dockerfile's WORKDIR)
    assert mounts["calibration"]["mountPath"] == "/app/" + env["EXPORT_CALIBRATION_DIR"]
    assert "calibration" in {v["name"] for v in pod_spec(job)["volumes"]}


def test_service_selects_the_deployment_pods() -> None:
    service, deployment = one("Service"), one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    job_labels = one("Job")["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= job_labels.items(), "selects export pods"
    http, grpc = service["spec"]["ports"]
    assert http["port"] == 8000
    assert container_port(serving_container(deployment), http["targetPort"]) == 8000
    assert (grpc["port"], grpc["appProtocol"]) == (8001, "kubernetes.io/h2c")
    assert container_port(serving_container(deployment), grpc["targetPort"]) == 8001


@pytest.mark.parametrize("doc", servers(), ids=lambda doc: doc["kind"])
def test_tokens_come_from_a_secret_never_from_a_value(doc: dict[str, Any]) -> None:
    container = serving_container(doc)
    env = {e["name"]: e for e in container["env"]}
    for kind in ("inference", "management"):
        token = env[f"{ENV_PREFIX}{kind.upper()}_TOKEN"]
        assert "value" not in token
        secret = token["valueFrom"]["secretKeyRef"]
        assert (secret["name"], secret["key"]) == ("resnet-serve-tokens", f"{kind}_token")
        assert secret["optional"] is True  # without the Secret the API stays open
    for path, doc in documents():
        for spec in [pod_spec(doc)] if doc["kind"] in {"Deployment", "Job"} else []:
            for c in spec["containers"]:
                plain = [
                    e["name"] for e in c.get("env", []) if "TOKEN" in e["name"] and "value" in e
                ]
                assert not plain, f"{path}: token values in the manifest: {plain}"


def test_env_vars_are_service_settings(tmp_path: Path) -> None:
    """Every RESNET_SERVE_* variable names a Settings field, and the servers' values pass its
    validation (with a real directory for the repository and the CPU request for valueFrom)."""
    from service.core import settings

    fields = settings.Settings.model_fields
    for path, doc in documents():
        if doc["kind"] not in {"Deployment", "Job", "InferenceService"}:
            continue
        for container in pod_spec(doc)["containers"]:
            names = [e["name"] for e in container.get("env", [])]
            assert len(names) == len(set(names)), f"{path}: duplicate variables"
            unknown = [
                n
                for n in names
                if n.startswith(ENV_PREFIX) and n[len(ENV_PREFIX) :].lower() not in fields
            ]
            assert not unknown, f"{path}: {unknown} are not fields of Settings"
    for doc in servers():
        container = serving_container(doc)
        values: dict[str, Any] = {}
        for e in container["env"]:
            field = e["name"][len(ENV_PREFIX) :].lower()
            if "secretKeyRef" in e.get("valueFrom", {}):
                values[field] = "a-secret-token-0123456789"  # the Secret's stand-in
                continue
            values[field] = (
                e["value"] if "value" in e else container["resources"]["requests"]["cpu"]
            )
        values["model_repository"] = tmp_path
        settings.Settings(**values)
