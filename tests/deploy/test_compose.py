"""compose.yaml: valid against the Compose Specification's JSON schema (as vendored by check-jsonschema),
and it runs the image the way the Dockerfile expects: both flavours, a read-only models volume on /models,
the HTTP and gRPC ports published on loopback, the GPU reserved for the GPU service, and a stop grace period
that outlasts the drain."""

from __future__ import annotations

import json
import re
from importlib.resources import files
from typing import Any

import jsonschema
import pytest

from .conftest import ROOT, final_stage, image_env, load_one


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_one(ROOT / "compose.yaml")


def compose_schema() -> dict[str, Any]:
    vendor = files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text(encoding="utf-8"))


def test_compose_file_is_valid_against_the_compose_specification(compose) -> None:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    validator.validate(compose)
    broken = json.loads(json.dumps(compose))
    broken["services"]["stageformer"]["stop_grace_perod"] = "90s"
    assert not validator.is_valid(broken), "the schema must reject unknown keys"


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, f"write the grace period in seconds, not {duration!r}"
    return float(match.group(1))


def image_ports(service: dict[str, Any]) -> dict[str, int]:
    """The ports the server listens on in this service's container: the image's settings, then the service's."""
    env = image_env(final_stage()["ENV"]) | service.get("environment", {})
    return {"http": int(env["STAGEFORMER_PORT"]), "grpc": int(env["STAGEFORMER_GRPC_PORT"])}


def published_ports(service: dict[str, Any]) -> dict[str, int]:
    """Container port per protocol, from ``${STAGEFORMER_PUBLISH:-127.0.0.1:8000}:8000``-style entries: on
    loopback unless the variable says otherwise, the same port number outside as inside."""
    found: dict[str, int] = {}
    for entry in service["ports"]:
        match = re.fullmatch(r"\$\{STAGEFORMER_(GRPC_)?PUBLISH:-127\.0\.0\.1:(\d+)\}:(\d+)", entry)
        assert match, f"publish as ${{STAGEFORMER_PUBLISH:-127.0.0.1:PORT}}:PORT, not {entry!r}"
        grpc, outside, inside = match.groups()
        assert outside == inside, entry
        found["grpc" if grpc else "http"] = int(inside)
    return found


def test_services_run_both_flavours_with_a_models_volume(compose) -> None:
    services = compose["services"]
    assert {name: service["build"]["args"]["FLAVOR"] for name, service in services.items()} == {
        "stageformer": "gpu",
        "stageformer-cpu": "cpu",
    }
    for service in services.values():
        assert service["build"]["context"] == "."
        (volume,) = service["volumes"]
        source, target, mode = volume.rsplit(":", 2)
        assert (target, mode) == ("/models", "ro")
        default = re.fullmatch(r"\$\{STAGEFORMER_MODELS_DIR:-(.+)\}", source)
        assert default, "the models folder is chosen with STAGEFORMER_MODELS_DIR"
        assert list((ROOT / default.group(1)).glob("*.onnx")), "the default folder must hold a model"
        assert published_ports(service) == image_ports(service), "publish the HTTP and the gRPC port"
        assert (
            seconds(service["stop_grace_period"])
            > 2 * float(service["environment"]["STAGEFORMER_REQUEST_TIMEOUT_S"]) + 5
        )
    (device,) = services["stageformer"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "deploy" not in services["stageformer-cpu"]
    assert services["stageformer-cpu"]["profiles"] == ["cpu"]  # `docker compose up` starts the GPU one only
