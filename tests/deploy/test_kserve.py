"""deploy/kserve: the two InferenceServices (stageformer as a custom predictor, Triton on the repository that
``stageformer export --triton-repo`` writes).

KServe's InferenceService is a custom resource, and no package here carries its CRD schema, so this is a
structural check: KServe's own fields are checked against the fields its v1beta1 API documents (unknown
ones rejected), and every part KServe takes from Kubernetes (pod spec fields, containers, resources,
probes, env, metadata) against Kubernetes' own strict schemas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest

from export.triton import TritonModel, write_repository
from service.registry import DEMO_MODEL, find_model_files
from service.settings import Settings

from .conftest import DEPLOY, K8S_DEFINITIONS, K8S_VERSIONS, env_list_to_dict, k8s_definitions, k8s_ref, load_one
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


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", ["stageformer.yaml", "triton.yaml"])
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


def test_custom_predictor_runs_our_image_on_kserves_terms(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = load_one(KSERVE / "stageformer.yaml")
    (container,) = doc["spec"]["predictor"]["containers"]
    assert container["name"] == "kserve-container"  # KServe finds STORAGE_URI and PROTOCOL on this name
    env = env_list_to_dict(container["env"])
    assert env["PROTOCOL"] == "v2"
    assert env["STORAGE_URI"].split("://")[0] in {"s3", "gs", "pvc", "https", "hf", "oci"}
    for name, value in env.items():
        if name.startswith("STAGEFORMER_"):
            assert name.removeprefix("STAGEFORMER_").lower() in Settings.model_fields, name
            monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.models == ["/mnt/models"]  # where KServe's storage initializer puts STORAGE_URI
    assert settings.host == "0.0.0.0"
    assert [port["containerPort"] for port in container["ports"]] == [settings.port]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": settings.port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": settings.port}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


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
