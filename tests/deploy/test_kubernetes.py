"""deploy/kubernetes: every manifest is valid against Kubernetes' own schemas (strict: unknown fields are
errors) for the oldest and newest release we support, and the pieces fit together: selectors, the HTTP and
gRPC ports (named, the Service targeting them, the numbers the settings give), probes on the Open Inference
Protocol health routes, GPU request, settings, a grace period that outlasts the server's drain, and the
Ingress (and the gRPC one its comment shows)."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml

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
    assert settings.grpc_port != 0, "the gRPC port must be on: the Deployment and Service expose it"
    assert settings.port != settings.grpc_port


def test_deployment_runs_the_image_as_the_probes_and_gpu_need(resources, monkeypatch) -> None:
    settings = settings_from(resources["ConfigMap"], monkeypatch)
    deployment = resources["Deployment"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert container["envFrom"] == [{"configMapRef": {"name": resources["ConfigMap"]["metadata"]["name"]}}]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert len(ports) == len(container["ports"]), "every container port needs a name of its own"
    assert ports == {"http": settings.port, "grpc": settings.grpc_port}
    assert all(port["protocol"] == "TCP" for port in container["ports"])

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
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    container_ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert set(ports) == {"http", "grpc"}
    for name, port in ports.items():  # by name, so that a port number changes in one place only
        assert port["targetPort"] == name and name in container_ports, name
        assert port["port"] == container_ports[name], name  # the same number inside and outside the cluster
    assert ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"  # gRPC without TLS: HTTP/2, prior knowledge
    hpa = resources["HorizontalPodAutoscaler"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
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
    assert backend["port"] == {"name": "http"}  # ingress-nginx speaks HTTP/1.1 to this port; gRPC goes apart


def grpc_ingress_example() -> dict[str, Any]:
    """The gRPC Ingress that ingress.yaml's comment shows, as the manifest it would be."""
    lines = (K8S / "ingress.yaml").read_text(encoding="utf-8").splitlines()
    start = lines.index("#   metadata:")
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("#   "))
    example = yaml.safe_load("\n".join(line.removeprefix("# ") for line in lines[start:end]))
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", **example}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_grpc_ingress_example_is_a_valid_ingress(version: str) -> None:
    kubernetes_validate.validate(grpc_ingress_example(), version, strict=True)


def test_the_grpc_ingress_example_reaches_the_grpc_port_over_tls(resources) -> None:
    example = grpc_ingress_example()
    ingress = resources["Ingress"]
    prefix = "nginx.ingress.kubernetes.io/"
    notes = example["metadata"]["annotations"]
    assert notes[prefix + "backend-protocol"] == "GRPC"  # HTTP/2 without TLS to the pods
    for limit in ("proxy-body-size", "proxy-read-timeout", "proxy-send-timeout"):  # the HTTP Ingress's limits
        assert notes[prefix + limit] == ingress["metadata"]["annotations"][prefix + limit], limit
    assert example["spec"]["ingressClassName"] == ingress["spec"]["ingressClassName"]
    assert example["metadata"]["name"] != ingress["metadata"]["name"]
    (tls,) = example["spec"]["tls"]  # gRPC clients reach ingress-nginx over TLS (HTTP/2 by ALPN)
    (rule,) = example["spec"]["rules"]
    assert tls["secretName"] and rule["host"] in tls["hosts"]
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    assert backend == {"name": resources["Service"]["metadata"]["name"], "port": {"name": "grpc"}}
