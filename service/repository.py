"""The model repository: load, reload and unload models of the model folders while the server runs (the Open
Inference Protocol's repository extension, which KServe's model agent and Triton clients call), and, with
``--watch``, follow the folders on their own.

What a repository name is: ``NAME`` for ``NAME.onnx`` in a model folder (or a file given directly), and for a
Triton-style ``NAME/1/model.onnx``. A file must hold the model of its name (the ``name`` in its metadata, see
``stageformer export --name``).

Guarantees:
- a load that fails changes nothing: the model already loaded under that name keeps serving;
- a reload swaps the new model in for new requests; requests already with the old one finish on it, and
  the old one stops once they have (at most ``drain_timeout_s``);
- an unload first takes the model out of the routes (404 from then on), then lets its requests finish;
- concurrent loads of one name load it once: the later callers wait for the load in progress.
Loading runs in a worker thread; everything else on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from .errors import Kind, ServiceError, not_found
from .pipeline import ModelPipeline
from .registry import ModelRegistry, find_model_files, load_model
from .runtime import ModelLoadError
from .state import AppState

logger = logging.getLogger(__name__)


def repository_name(path: Path) -> str:
    """The name a model file is known by in the repository."""
    if path.name == "model.onnx" and path.parent.name.isdigit():
        return path.parent.parent.name
    return path.stem


@dataclass(frozen=True)
class Entry:
    """One model of the repository index."""

    name: str
    state: str  # "READY" (served) or "UNAVAILABLE" (a file not loaded, or a model that cannot be found)
    reason: str
    path: Path | None


class Repository:
    """Loads and unloads the models of ``state.registry`` from the configured model folders."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self._loads: dict[str, asyncio.Task[ModelPipeline]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def registry(self) -> ModelRegistry:
        assert self.state.registry is not None, "the repository works once the first models are loaded"
        return self.state.registry

    def files(self) -> dict[str, Path]:
        """Repository name -> file, from the configured model paths as they are now."""
        try:
            found = find_model_files(self.state.settings.models)
        except ModelLoadError:  # a folder emptied or removed: it holds no models now
            found = []
        return {repository_name(path): path for path in found}

    def index(self) -> list[Entry]:
        """Every model served or found in the model folders, by name."""
        served = self.registry.models
        entries = {name: Entry(name, "READY", "", model.info.path) for name, model in served.items()}
        for name, path in self.files().items():
            if name not in entries:
                entries[name] = Entry(name, "UNAVAILABLE", "not loaded", path)
        return [entries[name] for name in sorted(entries)]

    # --- load ---------------------------------------------------------------------------------------

    async def load(self, name: str) -> ModelPipeline:
        """Load (or reload) ``name`` from its file; the model serving under that name keeps serving if this
        fails. A load of the same name already running is joined, not repeated."""
        running = self._loads.get(name)
        if running is None:
            running = asyncio.ensure_future(self._load(name))
            self._loads[name] = running
            running.add_done_callback(lambda _: self._loads.pop(name, None))
        return await asyncio.shield(running)

    async def _load(self, name: str) -> ModelPipeline:
        async with self._lock(name):
            path = self.files().get(name) or self._served_path(name)
            if path is None:
                raise not_found(f"no model file for {name!r} in the model folders ({self._folders()})")
            state, registry = self.state, self.registry
            assert state.decode_pool is not None
            try:
                model = await run_in_threadpool(load_model, path, state.settings, state.metrics, state.decode_pool)
            except ModelLoadError as exc:
                keeps = "; the model loaded before keeps serving" if name in registry.models else ""
                raise ServiceError(Kind.BAD_INPUT, f"cannot load model {name!r}: {exc}{keeps}") from None
            if model.name != name:
                self._retire(model)
                raise ServiceError(Kind.BAD_INPUT, f"{path} holds model {model.name!r}, not {name!r}; rename the file "
                                   f"or export it with --name {name}")  # fmt: skip
            old = registry.swap(name, model)
            if old is not None:
                self._retire(old)
            logger.info("%s model %r from %s", "reloaded" if old else "loaded", name, path)
            return model

    # --- unload -------------------------------------------------------------------------------------

    async def unload(self, name: str) -> None:
        """Stop serving ``name``: new requests get 404 at once; returns when its requests have finished."""
        async with self._lock(name):
            old = self.registry.swap(name, None)
            if old is None:
                raise not_found(f"model {name!r} is not loaded; loaded: {', '.join(sorted(self.registry.models))}")
            logger.info("unloading model %r: draining %d request(s)", name, old.arrivals)
            await self._drain(old)

    def _retire(self, model: ModelPipeline) -> None:
        """Let ``model`` finish its requests in the background, then stop it."""
        task = asyncio.ensure_future(self._drain(model))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _drain(self, model: ModelPipeline) -> None:
        self.registry.retired.add(model)
        try:
            deadline = time.monotonic() + self.state.settings.drain_timeout_s
            while model.arrivals > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if model.arrivals > 0:
                logger.warning("model %r still had %d request(s) after the drain timeout", model.name, model.arrivals)
                model.abort()
            await run_in_threadpool(model.batcher.close, self.state.close_timeout())
        finally:
            self.registry.retired.discard(model)

    async def close(self) -> None:
        """Wait for the models being retired (the registry closes the rest)."""
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    # --- watching the folders -----------------------------------------------------------------------

    async def watch(self, interval_s: float) -> None:
        """Follow the model folders: load a file that is new or changed once it has stayed the same for one
        interval (a file still being copied is left until it is complete), unload a model whose file is gone.
        Runs until cancelled."""
        seen = {name: _stamp(path) for name, path in self.files().items()}
        pending: dict[str, tuple[int, int]] = {}
        while True:
            await asyncio.sleep(interval_s)
            now = {name: _stamp(path) for name, path in self.files().items()}
            for name, stamp in now.items():
                if seen.get(name) == stamp:
                    continue
                if pending.get(name) != stamp:  # new or still changing: look again next time
                    pending[name] = stamp
                    continue
                pending.pop(name)
                seen[name] = stamp
                await self._follow(self.load(name), f"load {name!r}")
            for name in [n for n in seen if n not in now]:
                seen.pop(name)
                if name in self.registry.models:
                    await self._follow(self.unload(name), f"unload {name!r}")

    async def _follow(self, step: asyncio.Future[object] | object, what: str) -> None:
        try:
            await step  # type: ignore[misc]
        except ServiceError as exc:
            logger.warning("watch: could not %s: %s", what, exc.message)

    # --- helpers ------------------------------------------------------------------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _served_path(self, name: str) -> Path | None:
        model = self.registry.models.get(name)
        return model.info.path if model is not None else None

    def _folders(self) -> str:
        return ", ".join(self.state.settings.models) or "the built-in demo"


def _stamp(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError:
        return (0, 0)
    return (stat.st_mtime_ns, stat.st_size)
