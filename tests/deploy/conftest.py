"""Shared helpers for the deployment tests: the repository's files, YAML loading, and the Kubernetes JSON
schemas that ship with the ``kubernetes-validate`` package (offline, one folder per Kubernetes release)."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"

# The oldest and the newest Kubernetes release the manifests are checked against.
K8S_VERSIONS = ("1.30.0", "1.37.0")
K8S_DEFINITIONS = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s."  # how the schemas refer to each other


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document in ``path``."""
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def load_one(path: Path) -> dict[str, Any]:
    (doc,) = load_documents(path)
    return doc


@cache
def k8s_definitions(version: str) -> dict[str, Any]:
    """The strict (unknown fields rejected) definitions of every Kubernetes type in ``version``."""
    from importlib.resources import files

    folder = files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}-local-strict"
    return json.loads((folder / "_definitions.json").read_text(encoding="utf-8"))


def k8s_ref(name: str) -> dict[str, str]:
    """A JSON-schema reference to a Kubernetes type, e.g. ``k8s_ref("api.core.v1.Container")``."""
    return {"$ref": K8S_DEFINITIONS + name}


def validate_with_k8s_definitions(instance: object, schema: dict[str, Any], version: str) -> None:
    """Validate ``instance`` against ``schema``, whose ``$ref``s may point into Kubernetes' definitions."""
    import jsonschema
    from referencing import Registry, Resource

    definitions = k8s_definitions(version)
    registry: Registry = Resource.from_contents(definitions) @ Registry()
    jsonschema.Draft202012Validator(schema, registry=registry).validate(instance)


def env_list_to_dict(env: list[dict[str, Any]]) -> dict[str, str]:
    """A container's literal ``env`` entries as a dict (entries with ``valueFrom`` are left out)."""
    return {item["name"]: item["value"] for item in env if "value" in item}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def final_stage() -> dict[str, str]:
    """The image's own stage (from the last FROM on): instruction -> arguments, the last of each kind."""
    steps = instructions()
    return dict(steps[max(i for i, (kind, _) in enumerate(steps) if kind == "FROM") :])


def image_env(arguments: str) -> dict[str, str]:
    """The variables of an ``ENV K=V K2='V 2'`` instruction, quotes removed as Docker removes them."""
    pairs = [word.split("=", 1) for word in shlex.split(arguments)]
    assert all(len(pair) == 2 for pair in pairs), f"write ENV as KEY=VALUE pairs: {arguments}"
    return dict(pairs)  # type: ignore[arg-type]


def load_script(name: str) -> ModuleType:
    """One of the image's helper scripts in deploy/docker/, imported under a name of its own."""
    spec = importlib.util.spec_from_file_location(f"docker_{name}", DEPLOY / "docker" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
