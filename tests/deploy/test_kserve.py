"""deploy/kserve: the InferenceServices (stageformer as a custom predictor over HTTP and over gRPC, Triton on the
repository that ``stageformer export --triton-repo`` writes).

KServe's InferenceService is a custom resource, and no package here carries its CRD schema, so this is a
structural check: KServe's own fields are checked against the fields its v1beta1 API documents (unknown
ones rejected), and every part KServe takes from Kubernetes (pod spec fields, containers, resources,
probes, env, metadata) against Kubernetes' own strict schemas. Custom containers are also held to the rules
Knative Serving (KServe's default deployment mode) applies to them: one port, named for its protocol, and
probes that reach the server on every Knative release.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from export.triton import TritonModel, write_repository
from service.registry import DEMO_MODEL, find_model_files
from service.settings import Settings

from .conftest import (
    DEPLOY,
    K8S_DEFINITIONS,
    K8S_VERSIONS,
    env_list_to_dict,
    final_stage,
    image_env,
    k8s_definitions,
    k8s_ref,
    load_one,
    load_script,
)
from .conftest import validate_with_k8s_definitions as validate

KSERVE = DEPLOY / "kserve"
FRAMEWORKS = ("sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "pmml", "lightgbm", "paddle")


def inference_service_schema(version: str) -> dict[str, Any]:
    """serving.kserve.io/v1beta1 InferenceService as documented by KServe (InferenceServiceSpec,
    PredictorSpec = PodSpec + ComponentExtensionSpec + model/framework specs, ModelSpec = Container +
    PredictorExtensionSpec + modelFormat/runtime)."""
    definitions = k8s_definitions(version)["$defs"]

    def fields_of(kind: str) -> dict[str, Any]:
        """Every field of a Kubernetes type, each checked by that type's own schema."""
        return {
            name: {"$ref": f"{K8S_DEFINITIONS}{kind}/properties/{name}"}
            for name in definitions[f"io.k8s.{kind}"]["properties"]
        }

    string_map = {"type": "object", "additionalProperties": {"type": "string"}}
    component_extension = {
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
        "scaleTarget": {"type": "integer", "minimum": 1},
        "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
        "containerConcurrency": {"type": "integer", "minimum": 0},
        "timeout": {"type": "integer", "minimum": 0},
        "canaryTrafficPercent": {"type": "integer", "minimum": 0, "maximum": 100},
        "logger": {"type": "object"},
        "batcher": {"type": "object"},
        "labels": string_map,
        "annotations": string_map,
        "deploymentStrategy": k8s_ref("api.apps.v1.DeploymentStrategy"),
    }
    model_spec = {
        "type": "object",
        "required": ["modelFormat"],
        "additionalProperties": False,
        "properties": {
            **fields_of("api.core.v1.Container"),
            "modelFormat": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {"name": {"type": "string", "minLength": 1}, "version": {"type": "string"}},
            },
            "runtime": {"type": "string"},
            "runtimeVersion": {"type": "string"},
            "protocolVersion": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]},
            "storageUri": {"type": "string", "pattern": "^[a-z0-9+.-]+://"},
            "storage": {"type": "object"},
        },
    }
    predictor = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            **fields_of("api.core.v1.PodSpec"),
            **component_extension,
            "model": model_spec,
            **{name: {"type": "object"} for name in FRAMEWORKS},
        },
    }
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "serving.kserve.io/v1beta1"},
            "kind": {"const": "InferenceService"},
            "metadata": {
                "allOf": [k8s_ref("apimachinery.pkg.apis.meta.v1.ObjectMeta")],
                "required": ["name"],
            },
            "spec": {
                "type": "object",
                "required": ["predictor"],
                "additionalProperties": False,
                "properties": {
                    "predictor": predictor,
                    "transformer": {"type": "object"},
                    "explainer": {"type": "object"},
                },
            },
        },
    }


def check(doc: dict[str, Any], version: str) -> None:
    validate(doc, inference_service_schema(version), version)
    predictor = doc["spec"]["predictor"]
    # KServe: a predictor is exactly one of a model spec, a framework spec, or custom containers
    kinds = [key for key in ("model", "containers", *FRAMEWORKS) if key in predictor]
    assert len(kinds) == 1, f"predictor sets {kinds}; KServe wants exactly one"
    for container in predictor.get("containers", []):
        validate(container, k8s_ref("api.core.v1.Container"), version)  # name required, as in a pod
    if "containers" in predictor:
        check_knative_serving_port(predictor["containers"])


# Knative Serving's rules for the containers of a revision (pkg/apis/serving/k8s_validation.go and
# pkg/reconciler/revision/resources/deploy.go, queue.go): what KServe's Knative mode passes on unchanged.
KNATIVE_PORT_NAMES = {"", "h2c", "http1"}  # h2c: HTTP/2 without TLS (gRPC); http1 or none: HTTP/1.1
KNATIVE_RESERVED_PORTS = {8008, 8012, 8013, 8022, 9090, 9091}  # queue-proxy's and the profiling port
KNATIVE_RESERVED_ENV = {"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"}


def check_knative_serving_port(containers: list[dict[str, Any]]) -> dict[str, Any]:
    """The single port Knative routes to, after checking the rules Knative enforces on it and on the probes.
    Probes must hold on every Knative release: HTTP and TCP probes there target the serving port (Knative
    rewrites liveness ports to it unless multi-container-probing is on, and readiness ports before 1.14)."""
    ports = [port for container in containers for port in container.get("ports", [])]
    assert len(ports) <= 1, "Knative allows a single container port across all containers"
    port = ports[0] if ports else {"containerPort": 8080}
    assert port.get("name", "") in KNATIVE_PORT_NAMES, f"Knative port names are {sorted(KNATIVE_PORT_NAMES)}"
    assert port.get("protocol", "TCP") == "TCP"
    assert port["containerPort"] not in KNATIVE_RESERVED_PORTS, f"{port['containerPort']} is Knative's own"
    (serving,) = [c for c in containers if c.get("ports")] or containers[:1]
    for container in containers:
        assert not KNATIVE_RESERVED_ENV & {item["name"] for item in container.get("env", [])}, "Knative sets these"
    for kind in ("readinessProbe", "livenessProbe"):
        probe = serving.get(kind, {})
        for handler in ("httpGet", "tcpSocket"):
            if handler in probe:
                target = probe[handler]["port"]
                assert target in (port["containerPort"], port.get("name")), (
                    f"{kind}.{handler}.port {target}: Knative probes the serving port {port['containerPort']}"
                )
    return port


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", ["stageformer.yaml", "stageformer-grpc.yaml", "triton.yaml"])
def test_inference_service_is_structurally_valid(name: str, version: str) -> None:
    check(load_one(KSERVE / name), version)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "predictor", "minReplica"), 1),  # typo in a KServe field
        (("spec", "predictor", "containers", 0, "resource"), {}),  # typo in a Kubernetes field
        (("spec", "predictor", "containers", 0, "ports", 0, "containerPort"), "8080"),  # wrong type
        (("spec", "predictor", "scaleMetric"), "gpu"),  # not a KServe scale metric
    ],
)
def test_the_structural_check_rejects_mistakes(path: tuple[str | int, ...], value: object) -> None:
    doc = load_one(KSERVE / "stageformer.yaml")
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        check(doc, K8S_VERSIONS[-1])


@pytest.mark.parametrize(
    ("change", "mistake"),
    [
        (lambda c: c["ports"][0].update(name="grpc"), "Knative port names"),  # Knative knows h2c only
        (lambda c: c["ports"].append({"name": "http1", "containerPort": 8080}), "a single container port"),
        (lambda c: c.update(livenessProbe={"httpGet": {"path": "/v2/health/live", "port": 8080}}), "probes the"),
        (lambda c: c.update(readinessProbe={"tcpSocket": {"port": 8080}}), "probes the serving port"),
        (lambda c: c["ports"][0].update(containerPort=8012), "Knative's own"),  # queue-proxy's port
        (lambda c: c["env"].append({"name": "PORT", "value": "8081"}), "Knative sets these"),
    ],
)
def test_the_knative_check_rejects_what_knative_would(change: Callable[[Any], object], mistake: str) -> None:
    doc = load_one(KSERVE / "stageformer-grpc.yaml")
    check(doc, K8S_VERSIONS[-1])
    change(doc["spec"]["predictor"]["containers"][0])
    with pytest.raises(AssertionError, match=mistake):
        check(doc, K8S_VERSIONS[-1])


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The STAGEFORMER_* variables the server sees in ``container``: the image's, then the container's."""
    image = image_env(final_stage()["ENV"]) | env_list_to_dict(container["env"])
    return {name: value for name, value in image.items() if name.startswith("STAGEFORMER_")}


def settings_of(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The server's settings in ``container``, as `stageformer serve` reads them there."""
    for name in [name for name in os.environ if name.startswith("STAGEFORMER_")]:
        monkeypatch.delenv(name)
    for name, value in container_env(container).items():
        assert name.removeprefix("STAGEFORMER_").lower() in Settings.model_fields, name
        monkeypatch.setenv(name, value)
    return Settings()  # raises on any invalid value, as the server would at start-up


def test_custom_predictor_runs_our_image_on_kserves_terms(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = load_one(KSERVE / "stageformer.yaml")
    (container,) = doc["spec"]["predictor"]["containers"]
    assert container["name"] == "kserve-container"  # KServe finds STORAGE_URI and PROTOCOL on this name
    env = env_list_to_dict(container["env"])
    assert env["PROTOCOL"] == "v2"
    assert env["STORAGE_URI"].split("://")[0] in {"s3", "gs", "pvc", "https", "hf", "oci"}
    settings = settings_of(container, monkeypatch)
    assert settings.models == ["/mnt/models"]  # where KServe's storage initializer puts STORAGE_URI
    assert settings.host == "0.0.0.0"
    assert [port["containerPort"] for port in container["ports"]] == [settings.port]
    assert check_knative_serving_port([container]).get("name", "http1") == "http1"  # HTTP/1.1 to the server
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": settings.port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": settings.port}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_grpc_predictor_serves_the_open_inference_protocol_over_h2c(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = load_one(KSERVE / "stageformer-grpc.yaml")
    (container,) = doc["spec"]["predictor"]["containers"]
    assert container["name"] == "kserve-container"
    env = env_list_to_dict(container["env"])
    assert env["PROTOCOL"] == "grpc-v2"  # KServe's name for the Open Inference Protocol over gRPC
    settings = settings_of(container, monkeypatch)
    port = check_knative_serving_port([container])
    assert port == {"name": "h2c", "containerPort": settings.grpc_port, "protocol": "TCP"}
    assert settings.grpc_port == 8081 and settings.port == 8080  # KServe's conventions for gRPC and HTTP
    assert settings.host == "0.0.0.0" and settings.models == ["/mnt/models"]

    # readiness: the image's own health check, which asks the HTTP port inside the pod
    healthcheck = final_stage()["HEALTHCHECK"]
    assert container["readinessProbe"]["exec"]["command"] == json.loads(healthcheck.split(" CMD ", 1)[1])
    ready_url = load_script("healthcheck").ready_url(container_env(container))
    assert ready_url == f"http://127.0.0.1:{settings.port}/v2/health/ready"
    # liveness: the gRPC port accepts connections (it opens once the models are loaded and warmed up)
    assert container["livenessProbe"]["tcpSocket"] == {"port": settings.grpc_port}
    assert container["livenessProbe"]["initialDelaySeconds"] >= 60

    # the same server, models and resources as the HTTP InferenceService: only the protocol differs
    (http,) = load_one(KSERVE / "stageformer.yaml")["spec"]["predictor"]["containers"]
    http_env = env_list_to_dict(http["env"])
    protocol_only = {"PROTOCOL", "STAGEFORMER_PORT", "STAGEFORMER_GRPC_PORT"}
    assert {k: v for k, v in env.items() if k not in protocol_only} == {
        k: v for k, v in http_env.items() if k not in protocol_only
    }
    assert (container["image"], container["resources"]) == (http["image"], http["resources"])
    grpc_spec, http_spec = doc["spec"]["predictor"], load_one(KSERVE / "stageformer.yaml")["spec"]["predictor"]
    assert {k: v for k, v in grpc_spec.items() if k != "containers"} == {
        k: v for k, v in http_spec.items() if k != "containers"
    }


def test_triton_service_serves_the_exported_repository(tmp_path: Path) -> None:
    doc = load_one(KSERVE / "triton.yaml")
    model = doc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton"
    assert model["protocolVersion"] == "v2"
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # storageUri names the folder `export --triton-repo` wrote: <repo>/<name>/config.pbtxt and 1/model.onnx.
    # The same folder also serves as it is from our own image (mounted at /models, or STORAGE_URI above).
    repo = tmp_path / "triton-repo"
    write_repository(repo, TritonModel("digits", "raw", 24, 10, 32, 100), DEMO_MODEL, [str(i) for i in range(10)])
    assert (repo / "digits" / "config.pbtxt").is_file()
    assert find_model_files([str(repo)]) == [repo / "digits" / "1" / "model.onnx"]
