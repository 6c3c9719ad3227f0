"""``python -m bench gpu`` (or ``bench/gpu-check``): check the GPU path on a machine with an NVIDIA GPU and nothing
installed but Python 3.11+. From the repository root:

    python3 -m bench gpu                 # about 5-8 minutes, installs included; exit status 0 when every check passed
    python3 -m bench gpu --dry-run       # what it would install and run, nothing installed

It finds the card (``nvidia-smi``) before anything else and refuses at once, with "no CUDA device", where there is
none. Then, in two virtual environments under ``--work`` (the two ONNX Runtime packages must never meet):

- ``export``: the project's ``export`` extra (PyTorch, ONNX, ONNX Runtime for CPU) exports ``poolformer_s12``
  (random weights) to an fp32 and an fp16 ONNX file, each through the export's parity gate;
- ``serve``: the project's ``gpu`` extra, with ``onnxruntime-gpu`` built for the CUDA major version the driver
  supports and NVIDIA's CUDA and cuDNN libraries from the package index, where it checks: that ONNX Runtime really
  runs the model on CUDA (the session's provider, the GPU memory it took, its speed against the CPU provider),
  not on a silent CPU fallback; the fp32 and fp16 files on CUDA against fp32 on the CPU; the in-process limit of the
  server's runtime at batch 32; ``stageformer serve --device cuda --max-batch-size 32`` under load (``/v2`` binary
  tensors, 32 images a request) against that limit (served/limit >= 0.8); ``/v1`` JPEG files for information;
  then TensorRT where its libraries are installed (``--tensorrt install`` installs them into a folder of their
  own first; the package index holds only stand-ins for them that fetch the wheels from NVIDIA's own index).

It prints one line per check with its figure and the card's name, and exits with status 1 when a check failed,
2 when it could not run at all. Environments are kept in ``--work`` and reused while their requirements are the
same, so a second run skips the installs. The checks themselves are ``bench.gpu_stages``, run inside the
environments. This module needs the standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORK = REPO / "bench" / ".cache" / "gpu-check"
DEADLINE_S = 480.0  # the whole check, installs included; TensorRT runs only while time is left
EXPORT_TIMEOUT_S = 600.0  # a stage that takes longer hangs
MEASURE_TIMEOUT_S = 900.0
ORT_CUDA13_FROM = (1, 27)  # onnxruntime-gpu on the package index is built for CUDA 13 from 1.27, for CUDA 12 before
TORCH = "torch==2.13.0"  # the release the project is tested with (README)
PROTOCOL = "@@"  # stage output lines that start with it carry checks and steps; the rest goes to the log


class NoDeviceError(RuntimeError):
    """There is no usable NVIDIA GPU here; the message says what was found."""


# --- the card -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Card:
    names: tuple[str, ...]
    driver: str
    cuda: tuple[int, int]  # the highest CUDA version the driver supports

    @property
    def label(self) -> str:
        count = f"{len(self.names)}x " if len(self.names) > 1 else ""
        return f"{count}{self.names[0]}, driver {self.driver}, CUDA {self.cuda[0]}.{self.cuda[1]}"


def find_card(nvidia_smi: str = "nvidia-smi", timeout_s: float = 20.0) -> Card:
    """The NVIDIA GPUs as ``nvidia-smi`` lists them; ``NoDeviceError`` when it is missing, fails or lists none."""

    def run(*args: str) -> str:
        try:
            done = subprocess.run([nvidia_smi, *args], capture_output=True, text=True, timeout=timeout_s)
        except FileNotFoundError:
            raise NoDeviceError(f"{nvidia_smi!r} not found: no NVIDIA driver is installed") from None
        except (OSError, subprocess.SubprocessError) as exc:
            raise NoDeviceError(f"{nvidia_smi!r} could not run: {exc}") from None
        if done.returncode != 0:
            said = (done.stdout + done.stderr).strip().splitlines()
            raise NoDeviceError(
                f"{nvidia_smi!r} exited with status {done.returncode}: {said[0] if said else 'no output'}"
            )
        return done.stdout

    rows = [line.split(",") for line in run("--query-gpu=name,driver_version", "--format=csv,noheader").splitlines()]
    rows = [[cell.strip() for cell in row] for row in rows if len(row) >= 2 and row[0].strip()]
    if not rows:
        raise NoDeviceError(f"{nvidia_smi!r} lists no GPU")
    return Card(tuple(r[0] for r in rows), rows[0][1], driver_cuda(run()))


def driver_cuda(banner: str) -> tuple[int, int]:
    """The "CUDA Version: X.Y" of ``nvidia-smi``'s banner."""
    match = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", banner)
    if not match:
        raise NoDeviceError("nvidia-smi does not say which CUDA version its driver supports")
    return int(match[1]), int(match[2])


def onnxruntime_gpu_spec(cuda: tuple[int, int]) -> str:
    """The ``onnxruntime-gpu`` requirement whose CUDA build this driver runs, with NVIDIA's CUDA and cuDNN
    libraries (its ``cuda`` and ``cudnn`` extras)."""
    if cuda[0] >= 13:
        return "onnxruntime-gpu[cuda,cudnn]>=1.27"
    if cuda[0] == 12:
        return f"onnxruntime-gpu[cuda,cudnn]>=1.20,<{ORT_CUDA13_FROM[0]}.{ORT_CUDA13_FROM[1]}"
    raise NoDeviceError(f"the driver supports CUDA {cuda[0]}.{cuda[1]}; onnxruntime-gpu needs CUDA 12 or 13")


# --- requirements, from pyproject.toml ------------------------------------------------------------------


def requirements(extra: str, pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """The project's dependencies with one extra, its references to other extras resolved; the project itself
    is not installed (the checks run from the repository)."""
    import tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    name, extras = project["name"], project["optional-dependencies"]
    found: list[str] = list(project["dependencies"])
    todo, seen = [extra], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for requirement in extras[current]:
            own = re.fullmatch(rf"{re.escape(name)}\[([\w,\s-]+)\]", requirement.strip())
            if own:
                todo += [e.strip() for e in own[1].split(",")]
            else:
                found.append(requirement)
    return list(dict.fromkeys(found))


def package_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


# --- virtual environments -----------------------------------------------------------------------


@dataclass
class Env:
    """One virtual environment under the work folder, and how to install into it."""

    path: Path
    requirements: list[str]
    log: Path
    pip: list[str] = field(default_factory=list)

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def stamp(self) -> Path:
        return self.path / "gpu-check-requirements.json"

    def ready(self) -> bool:
        return self.python.exists() and self.stamp.is_file() and json.loads(self.stamp.read_text()) == self.requirements

    def create(self) -> None:
        """A fresh environment with pip; where this Python has no ``ensurepip``, one without pip that the
        system's pip installs into."""
        shutil.rmtree(self.path, ignore_errors=True)
        made = subprocess.run([sys.executable, "-m", "venv", str(self.path)], capture_output=True, text=True)
        if made.returncode == 0:
            self.pip = [str(self.python), "-m", "pip"]
            return
        has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
        if not has_pip:
            raise RuntimeError(
                f"cannot make a virtual environment ({made.stderr.strip().splitlines()[-1:]}) and this Python has no "
                "pip: install the venv module (Debian: apt-get install python3-venv) or pip"
            )
        shutil.rmtree(self.path, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(self.path)], check=True)
        self.pip = [sys.executable, "-m", "pip", "--python", str(self.python)]

    def install_command(self) -> list[str]:
        return [*self.pip, "install", "--disable-pip-version-check", "--progress-bar", "off", *self.requirements]


def lib_dirs(root: Path) -> list[str]:
    """Folders under ``root`` (site-packages of NVIDIA's wheels, or TensorRT's) that hold shared libraries."""
    if not root.is_dir():
        return []
    return sorted({str(p.parent) for p in root.rglob("*.so*") if p.is_file() and "lib" in p.parent.name.lower()})


def site_packages(env: Env) -> Path:
    found = sorted(env.path.glob("lib/python3*/site-packages"))
    return found[0] if found else env.path


def needed_version(library: Path, soname: str) -> int | None:
    """The major version of ``soname`` (e.g. ``libnvinfer.so``) that a shared library asks for: its dynamic
    section names it as ``soname.N``."""
    if not library.is_file():
        return None
    match = re.search(re.escape(soname).encode() + rb"\.(\d+)", library.read_bytes())
    return int(match[1]) if match else None


# --- stages: the checks, run inside an environment --------------------------------------------------


@dataclass
class Line:
    """One check's outcome: PASS, FAIL, SKIP or INFO, and its figure."""

    status: str
    name: str
    figure: str


@dataclass
class Checker:
    args: argparse.Namespace
    card: Card
    started: float = field(default_factory=time.monotonic)
    lines: list[Line] = field(default_factory=list)

    @property
    def left_s(self) -> float:
        return self.args.deadline - (time.monotonic() - self.started)

    def add(self, status: str, name: str, figure: str) -> None:
        line = Line(status, name, figure)
        self.lines.append(line)
        print(f"{status:<4}  {name:<28} {figure}  [{self.card.names[0]}]", flush=True)

    def note(self, message: str) -> None:
        print(f"      {message}", file=sys.stderr, flush=True)

    def stage(self, env: Env, name: str, timeout_s: float, extra_env: dict[str, str], *args: str) -> None:
        """Run ``python -m bench.gpu_stages NAME`` in ``env``; its check lines are added as they come. A stage that
        runs out of time, or dies, fails the step it was in."""
        argv = [str(env.python), "-m", "bench.gpu_stages", name, "--work", str(self.args.work), *args]
        environ = {**os.environ, "PYTHONPATH": str(REPO), **extra_env}
        log = self.args.work / f"stage-{name}.log"
        self.note(f"stage {name} (log: {log})")
        step = "start-up"
        with open(log, "w") as out:
            process = subprocess.Popen(
                argv, cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=out, text=True, start_new_session=True
            )
            timer = threading.Timer(max(timeout_s, 1.0), lambda: _kill_group(process))
            timer.start()
            try:
                assert process.stdout is not None
                for raw in process.stdout:
                    out.write(raw)
                    if raw.startswith(PROTOCOL + "step "):
                        step = raw[len(PROTOCOL) + 5 :].strip()
                    elif raw.startswith(PROTOCOL + "check "):
                        found = json.loads(raw[len(PROTOCOL) + 6 :])
                        self.add(found["status"], found["name"], found["figure"])
                code = process.wait()
            finally:
                timer.cancel()
        if code != 0:
            why = f"killed after {timeout_s:.0f} s" if code < 0 else f"exited with status {code}"
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            self.add("FAIL", f"{name}: {step}", f"the stage {why} during this step; log {log}: {tail[-300:]}")


def _kill_group(process: subprocess.Popen[str]) -> None:
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


# --- the run ------------------------------------------------------------------------------------


def plan(card: Card, args: argparse.Namespace) -> dict[str, Env]:
    """The two environments and what goes into each."""
    work: Path = args.work
    export = [args.torch if package_name(r) == "torch" else r for r in requirements("export")]
    if not any(package_name(r) == "torch" for r in export):
        export.append(args.torch)
    serve = [*requirements("gpu"), onnxruntime_gpu_spec(card.cuda)]
    if "onnxruntime-gpu" in map(package_name, export) or "onnxruntime" in map(package_name, serve):
        raise RuntimeError("the two environments would mix the two ONNX Runtime packages")
    return {
        "export": Env(work / "export-env", export, work / "install-export.log"),
        "serve": Env(work / "serve-env", serve, work / "install-serve.log"),
    }


def install(envs: Sequence[Env], checker: Checker) -> bool:
    """Create and fill the environments that are not ready yet, at the same time; False when one failed."""
    running: list[tuple[Env, subprocess.Popen[bytes], float]] = []
    ok = True
    for env in envs:
        if env.ready():
            checker.note(f"{env.path.name}: already installed")
            continue
        try:
            env.create()
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            checker.add("FAIL", f"install {env.path.name}", str(exc))
            ok = False
            continue
        checker.note(f"{env.path.name}: pip install {' '.join(shlex.quote(r) for r in env.requirements)}")
        log = open(env.log, "wb")  # noqa: SIM115 - closed when the process has ended
        running.append((env, subprocess.Popen(env.install_command(), stdout=log, stderr=log), time.monotonic()))
    for env, process, started in running:
        code = process.wait()
        seconds = time.monotonic() - started
        if code == 0:
            env.stamp.write_text(json.dumps(env.requirements))
            checker.add("INFO", f"install {env.path.name}", f"{seconds:.0f} s")
        else:
            tail = " | ".join(env.log.read_text(errors="replace").strip().splitlines()[-3:])
            checker.add("FAIL", f"install {env.path.name}", f"pip exited with status {code} ({tail[-300:]})")
            ok = False
    return ok


@dataclass
class TensorRT:
    """TensorRT's libraries for the last stage: with ``--tensorrt install``, pip installs them into
    ``work/tensorrt`` (in the major version ONNX Runtime's TensorRT provider asks for, built for its CUDA) while
    the other checks run; with ``present``, only ones the system already has count."""

    serve: Env
    checker: Checker
    major: int | None = None
    why: str = ""
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    spec: str = ""

    @property
    def folder(self) -> Path:
        return Path(self.checker.args.work) / "tensorrt"

    def start(self) -> None:
        capi = site_packages(self.serve) / "onnxruntime" / "capi"
        self.major = needed_version(capi / "libonnxruntime_providers_tensorrt.so", "libnvinfer.so")
        cuda = needed_version(capi / "libonnxruntime_providers_cuda.so", "libcudart.so") or self.checker.card.cuda[0]
        if self.major is None:
            self.why = "this onnxruntime-gpu has no TensorRT provider"
            return
        if self.checker.args.tensorrt != "install" or lib_dirs(self.folder):
            return
        self.spec = f"tensorrt-cu{cuda}-libs>={self.major},<{self.major + 1}"
        self.checker.note(f"TensorRT: pip install --target {self.folder} {self.spec} (in the background)")
        command = [*self.serve.pip, "install", "--disable-pip-version-check", "--progress-bar", "off", "--no-deps"]
        log = open(self.checker.args.work / "install-tensorrt.log", "wb")  # noqa: SIM115 - closed with the process
        self.started = time.monotonic()
        self.process = subprocess.Popen([*command, "--target", str(self.folder), self.spec], stdout=log, stderr=log)

    def finish(self) -> list[str]:
        """The library folders for ``LD_LIBRARY_PATH`` once the install ended; [] with ``why`` set when there are
        none."""
        if self.why:
            return []
        if self.process is not None:
            code = self.process.wait()
            if code != 0:
                shutil.rmtree(self.folder, ignore_errors=True)
                self.why = (
                    f"could not install {self.spec} (the package index's TensorRT packages fetch their wheels from "
                    f"NVIDIA's own index while installing; see {self.checker.args.work / 'install-tensorrt.log'})"
                )
                return []
            self.checker.add("INFO", "install tensorrt", f"{self.spec} in {time.monotonic() - self.started:.0f} s")
        dirs = lib_dirs(self.folder)
        if not dirs and not _loadable(f"libnvinfer.so.{self.major}"):
            self.why = (
                f"TensorRT {self.major} (libnvinfer.so.{self.major}) is not installed; --tensorrt install tries "
                "NVIDIA's packages"
            )
        return dirs


def _loadable(soname: str) -> bool:
    import ctypes

    try:
        ctypes.CDLL(soname)
    except OSError:
        return False
    return True


def run(args: argparse.Namespace) -> int:
    try:
        card = find_card(args.nvidia_smi)
    except NoDeviceError as exc:
        print(f"FAIL  gpu-check: no CUDA device: {exc}", flush=True)
        return 2
    checker = Checker(args, card)
    checker.add("INFO", "card", f"{card.label}; Python {sys.version.split()[0]}")
    try:
        envs = plan(card, args)
    except (NoDeviceError, RuntimeError) as exc:
        checker.add("FAIL", "plan", str(exc))
        return 1
    if args.dry_run:
        for name, env in envs.items():
            print(f"{name}: {env.path}: {' '.join(env.requirements)}")
        print(f"tensorrt: {args.tensorrt}; deadline {args.deadline:.0f} s")
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    if not install(list(envs.values()), checker):
        return _finish(checker)
    serve = envs["serve"]
    cuda_env = {"LD_LIBRARY_PATH": _paths(lib_dirs(site_packages(serve) / "nvidia"))}
    tensorrt = TensorRT(serve, checker)
    if args.tensorrt != "off":
        tensorrt.start()
    checker.stage(envs["export"], "export", EXPORT_TIMEOUT_S, {}, "--preset", args.preset)
    if not (args.work / "models" / f"{args.preset}.onnx").is_file():
        return _finish(checker)
    checker.stage(serve, "measure", MEASURE_TIMEOUT_S, cuda_env, "--preset", args.preset, "--device", args.device)
    if args.tensorrt == "off":
        checker.add("SKIP", "tensorrt", "--tensorrt off")
        return _finish(checker)
    dirs = tensorrt.finish()
    if tensorrt.why:
        checker.add("SKIP", "tensorrt", tensorrt.why)
    elif checker.left_s < 60:
        checker.add("SKIP", "tensorrt", f"{checker.left_s:.0f} s left of the {args.deadline:.0f} s deadline")
    else:
        trt_env = {"LD_LIBRARY_PATH": _paths([*dirs, *lib_dirs(site_packages(serve) / "nvidia")])}
        budget = f"{checker.left_s - 5.0:.0f}"
        checker.stage(serve, "tensorrt", checker.left_s, trt_env, "--preset", args.preset, "--budget", budget)
    return _finish(checker)


def _paths(dirs: list[str]) -> str:
    return os.pathsep.join([*dirs, *filter(None, [os.environ.get("LD_LIBRARY_PATH")])])


def _finish(checker: Checker) -> int:
    seconds = time.monotonic() - checker.started
    within = seconds <= checker.args.deadline
    checker.add(
        "PASS" if within else "FAIL", "time", f"{seconds:.0f} s in all (deadline {checker.args.deadline:.0f} s)"
    )
    failed = [line.name for line in checker.lines if line.status == "FAIL"]
    verdict = f"{len(failed)} check(s) failed: {', '.join(failed)}" if failed else "every check passed"
    print(f"gpu-check: {verdict} on {checker.card.label}", flush=True)
    return 1 if failed else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="folder for the environments, models and logs")
    p.add_argument("--preset", default="poolformer_s12", help="model exported and served (default poolformer_s12)")
    p.add_argument("--torch", default=TORCH, help=f"PyTorch requirement of the export environment (default {TORCH})")
    p.add_argument(
        "--tensorrt", choices=("present", "install", "off"), default="present",
        help="present: check TensorRT where its libraries are installed (default); install: pip installs them in the "
        "version ONNX Runtime asks for (the package index's TensorRT packages download from NVIDIA's own index); "
        "off: no TensorRT check",
    )  # fmt: skip
    p.add_argument(
        "--deadline", type=float, default=DEADLINE_S, help=f"seconds for everything (default {DEADLINE_S:g})"
    )
    p.add_argument("--nvidia-smi", default="nvidia-smi", help="the nvidia-smi to ask (default: the one on PATH)")
    p.add_argument("--dry-run", action="store_true", help="find the card and say what would be installed; no installs")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: try the measure stage without a GPU
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.work = args.work.resolve()
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
