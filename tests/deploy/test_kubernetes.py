"""deploy/kubernetes: every manifest is valid against Kubernetes' own schemas (strict: unknown fields are
errors) for the oldest and newest release we support, and the pieces fit together: selectors, ports,
probes on the Open Inference Protocol health routes, GPU request, settings, and a grace period that
outlasts the server's drain."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from service.settings import Settings

from .conftest import DEPLOY, K8S_VERSIONS, load_documents, load_one

K8S = DEPLOY / "kubernetes"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_one(K8S / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(p.name for p in MANIFESTS)
    assert [image["name"] for image in kustomization["images"]] == ["stageformer"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_against_the_kubernetes_schema(path, version: str) -> None:
    documents = load_documents(path)
    assert documents, f"{path.name} holds no manifest"
    for doc in documents:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_what_kubernetes_would() -> None:
    deployment = load_one(K8S / "deployment.yaml")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["httpGet"]["paht"] = "/typo"  # unknown field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    deployment = load_one(K8S / "deployment.yaml")
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


@pytest.fixture(scope="module")
def resources() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path in MANIFESTS:
        for doc in load_documents(path):
            assert doc["kind"] not in found, f"two {doc['kind']}s"
            found[doc["kind"]] = doc
    kinds = {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim", "Ingress"}
    assert set(found) == kinds
    return found


def settings_from(config_map: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name, value in config_map["data"].items():
        assert name.startswith("STAGEFORMER_"), name
        field = name.removeprefix("STAGEFORMER_").lower()
        assert field in Settings.model_fields, f"{name} is no setting of stageformer serve"
        monkeypatch.setenv(name, value)
    return Settings()  # raises on any invalid value, as the server would at start-up


def test_config_map_holds_valid_settings(resources, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(resources["ConfigMap"], monkeypatch)
    assert settings.host == "0.0.0.0"
    assert settings.models == ["/models"]
    assert settings.device == "cuda"


def test_deployment_runs_the_image_as_the_probes_and_gpu_need(resources, monkeypatch) -> None:
    settings = settings_from(resources["ConfigMap"], monkeypatch)
    deployment = resources["Deployment"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert container["envFrom"] == [{"configMapRef": {"name": resources["ConfigMap"]["metadata"]["name"]}}]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": settings.port}

    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"  # extended resources: requests == limits

    for probe, path in (
        ("startupProbe", "/v2/health/ready"),
        ("readinessProbe", "/v2/health/ready"),
        ("livenessProbe", "/v2/health/live"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "model loading needs time"

    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001  # the image's user
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    assert settings.trt_cache_dir in mounts, "the TensorRT cache must be writable on a read-only root"
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    claim = volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == resources["PersistentVolumeClaim"]["metadata"]["name"]


def test_grace_period_outlasts_the_drain(resources, monkeypatch) -> None:
    settings = settings_from(resources["ConfigMap"], monkeypatch)
    spec = resources["Deployment"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    # the server waits for admitted requests up to drain_timeout_s (service/cli.py), then uvicorn's own
    # shutdown (5 s) and the batchers' last inference call (at least 5 s) follow.
    drain = settings.drain_timeout_s + 10
    assert spec["terminationGracePeriodSeconds"] > pre_stop + drain


def test_service_and_autoscaler_point_at_the_deployment(resources) -> None:
    deployment = resources["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = resources["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"
    hpa = resources["HorizontalPodAutoscaler"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "cpu" in container["resources"]["requests"], "CPU utilization needs a CPU request"


def test_the_ingress_stops_slow_and_oversized_requests_at_the_edge(resources, monkeypatch) -> None:
    settings = settings_from(resources["ConfigMap"], monkeypatch)
    ingress = resources["Ingress"]
    notes = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert notes[prefix + "proxy-request-buffering"] == "on"  # nginx holds slow uploads, not the pods
    size = notes[prefix + "proxy-body-size"]
    assert size.endswith("m") and int(size[:-1]) * 2**20 == settings.max_body_bytes
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(notes[prefix + timeout]) > settings.request_timeout_s, timeout
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    service = resources["Service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
