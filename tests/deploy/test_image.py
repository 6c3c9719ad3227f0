"""The CPU image, built from this Dockerfile and run with podman as a user runs it with Docker: it becomes
ready, answers the health check, classifies an image through the published port, answers the Open Inference
Protocol over gRPC on its own published port, serves a mounted /models folder, rejects bad settings from the
environment, carries no torch, and on SIGTERM finishes the requests it holds and exits 0.

No registry is reachable here, so the CPU base image is a local Debian image with Python made by
deploy/ci/podman-setup.sh (CI runs it first; this module runs it when the image is missing). Where podman
is not installed the module is skipped, except in CI, where that is an error.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image, ImageDraw

from export.triton import TritonModel, write_repository
from service.registry import DEMO_MODEL
from stageformer.local import NotReadyError, free_port, wait_until_ready

from ..service.harness import slow_model
from .conftest import DEPLOY, ROOT

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="podman runs Linux containers on Linux hosts only")

IMAGE = "localhost/stageformer:test-cpu"
BASE_IMAGE = os.environ.get("STAGEFORMER_TEST_BASE_IMAGE", "localhost/stageformer-base:bookworm")
SETUP = DEPLOY / "ci" / "podman-setup.sh"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
MAX_CPU_IMAGE_BYTES = 450_000_000  # torch alone would add about 750 MB
# `podman run` options: this machine's hard limits are below podman's defaults
RUN = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")


def podman() -> list[str]:
    """The podman command with the options this kind of machine needs (runc; crun fails on its cgroups)."""
    found = shutil.which("podman")
    if found is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("podman is missing: .ci/run must run deploy/ci/podman-setup.sh before the tests")
        pytest.skip("podman is not installed; deploy/ci/podman-setup.sh installs it (as root, on Debian)")
    return [found, "--runtime", "runc"] if shutil.which("runc") else [found]


def run(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*podman(), *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def image() -> str:
    if run("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        setup = subprocess.run(["bash", str(SETUP), "base"], capture_output=True, text=True, timeout=600)
        assert setup.returncode == 0, f"{SETUP} base failed:\n{setup.stdout}\n{setup.stderr}"
    build = ["build", "--isolation=chroot", "--format", "docker", "-t", IMAGE]
    build += ["--build-arg", "FLAVOR=cpu", "--build-arg", f"CPU_BASE_IMAGE={BASE_IMAGE}"]
    if HOST_CA.is_file():  # pip inside the build trusts what this machine trusts
        build += ["-v", f"{HOST_CA}:{HOST_CA}:ro"]
    run(*build, str(ROOT), timeout=900)
    return IMAGE


@contextmanager
def container(
    image: str, *args: str, env: dict[str, str] | None = None, volume: str | None = None
) -> Iterator[tuple[str, int, int]]:
    """A detached container publishing its HTTP (8000) and gRPC (8001) ports on 127.0.0.1, as
    `docker run -p 8000:8000 -p 8001:8001` does; yields its name and the two host ports. Removed afterwards."""
    port, grpc_port = free_port(), free_port()
    name = f"stageformer-test-{os.getpid()}-{port}"
    options = [*RUN, "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", "-p", f"127.0.0.1:{grpc_port}:8001"]
    for key, value in (env or {}).items():
        options += ["-e", f"{key}={value}"]
    if volume:
        options += ["-v", volume]
    run("run", *options, image, *args)
    try:
        yield name, port, grpc_port
    finally:
        run("rm", "-f", "-t", "0", name, check=False)


def get(port: int, path: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(name: str, port: int, timeout_s: float = 120) -> None:
    def died() -> str | None:
        if run("inspect", "--format", "{{.State.Running}}", name).stdout.strip() == "true":
            return None
        return f"container exited before it was ready:\n{run('logs', name).stderr}"

    try:
        wait_until_ready(port, died=died, timeout_s=timeout_s, interval_s=0.5)
    except NotReadyError as exc:
        pytest.fail(f"{exc}\n{run('logs', name, check=False).stderr}")


def drawn_zero() -> bytes:
    """A dark ring on light paper, as a person would draw a 0."""
    picture = Image.new("RGB", (96, 96), (245, 243, 235))
    ImageDraw.Draw(picture).ellipse((28, 14, 68, 82), outline=(25, 25, 35), width=8)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def classify(port: int, png: bytes, timeout: float = 30) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/classify?top_k=3", data=png, headers={"Content-Type": "image/png"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def queue_depth(port: int) -> float:
    status, body = get(port, "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith("stageformer_queue_depth{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_image_is_small_non_root_and_has_no_torch(image: str) -> None:
    config = json.loads(run("image", "inspect", image).stdout)[0]
    assert config["Size"] < MAX_CPU_IMAGE_BYTES, f"{config['Size'] / 1e6:.0f} MB"
    assert config["Config"]["User"] == "10001:10001"
    assert {"8000/tcp", "8001/tcp"} <= set(config["Config"]["ExposedPorts"])  # HTTP and gRPC
    assert {"STAGEFORMER_PORT=8000", "STAGEFORMER_GRPC_PORT=8001"} <= set(config["Config"]["Env"])
    assert config["Config"]["Entrypoint"] == ["dumb-init", "--", "stageformer", "serve"]
    assert "/opt/stageformer/healthcheck.py" in " ".join(config["Healthcheck"]["Test"])  # podman lists it apart
    script = "import importlib.util as u; print(sorted(m for m in ('torch', 'pip', 'onnxruntime') if u.find_spec(m)))"
    result = run("run", *RUN, "--rm", "--entrypoint", "python", image, "-c", script)
    assert result.stdout.strip().splitlines()[-1] == "['onnxruntime']", result.stdout  # no torch, no installer


def test_serves_the_demo_at_once(image: str) -> None:
    with container(image) as (name, port, _):
        wait_ready(name, port)
        assert run("healthcheck", "run", name, check=False).returncode == 0  # the image's HEALTHCHECK
        status, body = classify(port, drawn_zero())
        assert status == 200, body
        assert body["model"] == "digits"
        assert body["results"][0]["predictions"][0]["label"] == "0", body


def test_drains_on_sigterm_and_exits_zero(image: str, tmp_path: Path) -> None:
    # A lone request never waits in the batcher, so a slow model (tens of ms a call) run one image at a time
    # (no lanes beside it) keeps requests queued long enough to stop the container while they wait.
    models = tmp_path / "models"
    slow_model(models / "slow.onnx")
    settings = {"STAGEFORMER_MAX_BATCH_SIZE": "1", "STAGEFORMER_MAX_QUEUE_DELAY_MS": "0", "STAGEFORMER_LANES": "0"}
    with container(image, env=settings, volume=f"{models}:/models:ro") as (name, port, _):
        wait_ready(name, port)
        with ThreadPoolExecutor(12) as pool:
            replies = [pool.submit(classify, port, drawn_zero()) for _ in range(12)]
            deadline = time.monotonic() + 30
            while queue_depth(port) < 6:  # half of them queued, not yet run
                assert time.monotonic() < deadline, "the requests never queued up"
                assert not all(reply.done() for reply in replies), "every request finished before the stop"
                time.sleep(0.02)
            started = time.monotonic()
            run("stop", "-t", "60", name, timeout=90)  # SIGTERM, then SIGKILL only after 60 s
            stopped_in = time.monotonic() - started
            answers = [reply.result(timeout=30) for reply in replies]

        assert [status for status, _ in answers] == [200] * 12, answers  # every admitted request finished
        state = json.loads(run("inspect", name).stdout)[0]["State"]
        logs = run("logs", name).stderr
        assert state["ExitCode"] == 0, logs
        assert stopped_in < 30, f"stopping took {stopped_in:.1f} s: SIGTERM did not reach the server"
        assert "stopped" in logs  # the server's own shutdown ran


def test_answers_the_open_inference_protocol_over_grpc_on_its_published_port(image: str) -> None:
    with container(image) as (name, port, grpc_port):
        wait_ready(name, port)
        with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
            assert client.is_server_live() and client.is_server_ready()
            assert client.is_model_ready("digits")
            meta = client.get_model_metadata("digits", as_json=True)
            (tensor,) = meta["inputs"]
            assert (tensor["name"], tensor["datatype"]) == ("image", "UINT8")
            batch, height, width, channels = (int(size) for size in tensor["shape"])
            assert (batch, channels) == (-1, 3)
            # the model's own input: the drawn 0, resized to the model's size on the client, as gRPC clients do
            pixels = np.asarray(Image.open(io.BytesIO(drawn_zero())).resize((width, height), Image.BILINEAR))
            pixels = pixels[np.newaxis]
            inputs = [grpcclient.InferInput("image", list(pixels.shape), "UINT8")]
            inputs[0].set_data_from_numpy(pixels)
            (output,) = meta["outputs"]
            result = client.infer("digits", inputs, outputs=[grpcclient.InferRequestedOutput(output["name"])])
            logits = result.as_numpy(output["name"])
            top = client.infer(
                "digits", inputs, outputs=[grpcclient.InferRequestedOutput(output["name"], class_count=1)]
            ).as_numpy(output["name"])
    expected = ort.InferenceSession(str(DEMO_MODEL)).run(None, {"image": pixels})[0]  # this machine's runtime
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    assert int(np.argmax(logits)) == 0, logits
    assert top[0][0].decode().split(":")[1:] == ["0", "0"], top  # score:index:label of the best class


def test_serves_a_mounted_models_folder(image: str, tmp_path: Path) -> None:
    repo = tmp_path / "models"  # a Triton-style tree, as `stageformer export --triton-repo` writes it
    write_repository(repo, TritonModel("mounted", "raw", 24, 10, 16, 100), DEMO_MODEL, [str(i) for i in range(10)])
    with container(image, volume=f"{repo}:/models:ro") as (name, port, _):
        wait_ready(name, port)
        assert get(port, "/v2/models/mounted/ready")[0] == 200
        assert get(port, "/v2/models/digits")[0] == 404  # the mount replaces the image's demo folder
        status, body = classify(port, drawn_zero())
        assert (status, body["model"]) == (200, "mounted")


def test_bad_settings_from_the_environment_stop_the_container_with_a_message(image: str) -> None:
    result = run("run", *RUN, "--rm", "-e", "STAGEFORMER_MAX_BATCH_SIZE=0", image, check=False, timeout=120)
    assert result.returncode == 2
    assert "max_batch_size" in result.stderr
