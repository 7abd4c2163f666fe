"""`quantserve serve [MODEL]`: flags generated from Settings (one source of truth), then uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
import types
import typing
from typing import Annotated, Any, Callable, Optional, Sequence

from pydantic import SecretStr

from .config import Settings

logger = logging.getLogger("quantserve.server")


def _flag_type(annotation: Any) -> tuple[Any, Optional[list[str]], bool]:
    """(argparse type, choices, is_list) for a Settings field annotation."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _flag_type(args[0])
    if origin in (typing.Union, types.UnionType):  # e.g. a number or "auto": the field's validator parses it
        return str, None, False
    if origin is typing.Literal:
        return str, [str(a) for a in typing.get_args(annotation)], False
    if origin is list:
        return str, None, True
    if annotation is SecretStr:
        return str, None, False
    return annotation, None, False


def _field_parser(name: str, field: Any) -> Callable[[str], Any]:
    """argparse's `type` for a flag: the text validated as the Settings field itself (pydantic, with
    the field's constraints), so that a flag is refused at parse time, naming it, for the reason
    Settings would give."""
    from pydantic import TypeAdapter, ValidationError

    annotation = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    adapter = TypeAdapter(annotation)

    def parse(text: str) -> Any:
        try:
            return adapter.validate_python(text)
        except ValidationError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: " + "; or ".join(e["msg"] for e in exc.errors())) from None

    parse.__name__ = name
    return parse


def add_settings_arguments(parser: argparse.ArgumentParser, names: Optional[Sequence[str]] = None,
                           defaults: Optional[dict[str, Any]] = None) -> None:
    """Flags generated from Settings' fields: their names, types, choices, constraints and help.

    names None (`serve`): every field, left out of the namespace unless given, so that Settings
    then reads the QUANTSERVE_* variable or its default. names given (the other commands, which
    take no environment): those fields, each with its Settings default or the one in `defaults`."""
    serve = names is None
    for name in Settings.model_fields if serve else names:
        field = Settings.model_fields[name]
        description = (field.description or "").replace("%%", "%")
        env = f"QUANTSERVE_{name.upper()}"
        default = field.get_default(call_default_factory=True) if serve else (defaults or {}).get(
            name, field.get_default(call_default_factory=True))
        if serve:
            shown = "" if default in (None, []) else f"; default {default}"
            help_text = f"{description} [env {env}{shown}]"
        else:
            help_text = description if default in (None, [], False) else f"{description} (default: {default})"
        help_text = help_text.replace("%", "%%")
        value = argparse.SUPPRESS if serve else default
        if name == "models":  # `serve [MODEL ...]`
            parser.add_argument("models", nargs="*", default=value, metavar="MODEL", help=help_text)
            continue
        if name == "model" and not serve:  # the other commands' one MODEL; serve has --model too
            parser.add_argument("model", nargs="?", default=value, metavar="MODEL", help=help_text)
            continue
        flag = "--" + name.replace("_", "-")
        kind, choices, is_list = _flag_type(field.annotation)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=help_text)
        elif is_list:
            parser.add_argument(flag, nargs="+", default=value, metavar="VALUE", help=help_text)
        elif choices is not None:  # argparse lists them in the usage and refuses others by name
            parser.add_argument(flag, choices=choices, default=value, help=help_text)
        else:
            parser.add_argument(flag, type=_field_parser(name, field), default=value, metavar=name.upper(),
                                help=help_text)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """`quantserve serve`'s arguments: every Settings field."""
    add_settings_arguments(parser)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags given on the command line override QUANTSERVE_* variables, which override defaults."""
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    return Settings(**given)


def prepare_process(settings: Settings) -> None:
    """What the process sets once for every model it serves: torch's float32 matmul precision and
    the CPU thread count."""
    import torch

    from .cpu_threads import apply_cpu_threads

    torch.set_float32_matmul_precision(settings.matmul_precision)
    logger.info("float32 matmul precision: %s%s", settings.matmul_precision,
                " (bf16 products where the CPU has AVX-512-BF16)" if settings.matmul_precision == "medium" else "")
    threads, why = apply_cpu_threads(settings.cpu_threads)
    logger.info("CPU threads: %d (%s)", threads, why)


def load_served_model(settings: Settings, worker: Any = None, estimate: Any = None) -> Any:
    """Load one model (quantized), build its engine and warm it up, on the calling thread: the
    registry's loader. worker: the device worker that will step it (None: one of its own)."""
    from .engine import AsyncEngine, EngineConfig
    from .loading.loader import load_for_serving
    from .loading.peak_memory import release_free_memory
    from .api.load_thread import freeze_loaded_objects
    from .api.served_model import ServedModel

    settings = fit_to_memory(settings, estimate)
    loaded = load_for_serving(settings)
    config = EngineConfig.from_settings(settings)
    engine = AsyncEngine(loaded.model, loaded.tokenizer, config, embedding_only=loaded.embedding_only, worker=worker)
    engine.prepare()  # warm-up here, off the device worker's thread
    # The engine's build and warm-up leave freed temporaries in the C heap: give them back to the OS
    # now (34 MiB on the default model, RSS before/after in one process) instead of holding them idle.
    release_free_memory()
    for name, path in settings.lora_pairs():  # a bad adapter fails the load (exit 1 for a one-model server)
        adapter = engine.loras.load(name, path, reserved=(settings.display_name(),))
        logger.info("LoRA adapter '%s' (rank %d, %s) from %s", name, adapter.rank, ", ".join(adapter.target_modules),
                    path)
    freeze_loaded_objects()
    return ServedModel(
        name=settings.display_name(),
        engine=engine,
        tokenizer=loaded.tokenizer,
        max_model_len=engine.max_model_len,
        load_report=loaded.report,
    )


def build_registry(settings: Settings) -> Any:
    """The registry of every model these settings name (ValueError for a bad catalog)."""
    import torch

    from .api.model_entry import ModelCost
    from .api.registry import Registry
    from .engine.device_worker import DeviceWorker
    from .loading.catalog import build_catalog
    from .loading.estimate import estimate_for_settings

    catalog = build_catalog(settings)
    workers: dict[str, DeviceWorker] = {}
    estimates: dict[str, Any] = {}

    def worker_for(spec: Any) -> DeviceWorker:
        device = spec.settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        device = str(torch.device(device if device != "cuda" else "cuda:0"))
        if device not in workers:  # one worker per device, its CPU threads followed unless pinned
            workers[device] = DeviceWorker(device, follow_cpu_load=settings.cpu_threads is None)
        return workers[device]

    budget = None
    if settings.models_memory is not None or not catalog.single:  # a one-model server: fit_to_memory's check
        from .loading.estimate import models_budget

        device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        budget, source = models_budget(device, settings.models_memory, settings.gpu_memory_utilization)
        logger.info("models' memory budget: %s (%s)", "none" if budget is None else f"{budget / 2**30:.2f} GiB",
                    source)
    slots = settings.models_max or len(catalog.specs)
    shares: dict[str, Settings] = {}

    def settings_for(spec: Any) -> Settings:
        """A model's settings, with its KV cache share on a GPU shared by several models: an
        equal part of the budget per model slot (--models-max, else one per known model), less
        its weights and one step's activations (a model alone on a GPU would take 90% of what is
        free for its KV cache, leaving nothing for the next). On a CPU each model's KV cache is
        its --kv-cache-memory (default 1 GiB of float32's tokens), counted in its cost."""
        s = spec.settings
        device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if catalog.single or budget is None or s.kv_cache_memory is not None or not device.startswith("cuda"):
            return s
        if spec.name in shares:  # priced once: the estimator and the loader both ask
            return shares[spec.name]
        probe = estimate_for_settings(s.model_copy(update={"kv_cache_memory": 1 / 1024}))
        share = max(budget / slots - probe.weight_bytes - probe.activation_reserve_bytes, 2**28)
        logger.info("model '%s': KV cache %.2f GiB (its share of %.2f GiB over %d models)", spec.name, share / 2**30,
                    budget / 2**30, slots)
        shares[spec.name] = s.model_copy(update={"kv_cache_memory": share / 2**30})
        return shares[spec.name]

    def estimator(spec: Any) -> ModelCost:
        est = estimate_for_settings(settings_for(spec))
        estimates[spec.name] = est
        return ModelCost(est.weight_bytes, est.kv_cache_bytes, est.serving_bytes)

    def loader(spec: Any, worker: Any) -> Any:
        return load_served_model(settings_for(spec), worker, estimates.pop(spec.name, None))

    return Registry(catalog, loader, estimator if not catalog.single or budget is not None else None,
                    budget_bytes=budget, max_loaded=settings.models_max, workers=worker_for)


def fit_to_memory(settings: Settings, estimate: Any = None) -> Settings:
    """The check before loading (server/loading/estimate.py, from the config and the tensor index):
    ValueError, with the estimate's explanation, when the model cannot fit; with --max-model-len
    auto, the settings with the longest context that fits (logged). estimate: made already."""
    from .loading.estimate import estimate_for_settings, fit_settings

    try:
        estimate = estimate if estimate is not None else estimate_for_settings(settings)
    except (ValueError, OSError):
        raise  # the model itself cannot be read: the loader would say the same
    except Exception as exc:  # noqa: BLE001 - a gap in the estimate must not stop a model that loads
        logger.warning("memory estimate failed (%s: %s); loading without the check", type(exc).__name__, exc)
        return settings.model_copy(update={"max_model_len": None}) if settings.max_model_len == "auto" else settings
    logger.info("memory estimate: %s", estimate.verdict)
    update = fit_settings(estimate, auto=settings.max_model_len == "auto")
    if settings.max_model_len == "auto":
        kv = update.get("kv_cache_memory")
        logger.info("--max-model-len auto: %d tokens (model: %d, KV cache %s)", update["max_model_len"],
                    estimate.model_max_len, f"shrunk to {kv:.3f} GiB to fit" if kv else "as configured")
    return settings.model_copy(update=update) if update else settings


def run(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT (exit 0 once drained). A model that cannot be served, or an
    engine that dies while serving, is one line `quantserve serve: error: ...` on stderr and exit
    status 1, so that a supervisor sees the failure instead of a port answering 503 forever."""
    from .loading.sources import check_source

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .loading.catalog import build_catalog

    try:  # milliseconds, before the port opens: a mistyped path or a taken port fails at once
        catalog = build_catalog(settings)
        for spec in catalog.specs:
            if spec.preload:
                check_source(spec.settings.model, spec.settings.revision)
        _check_listen(settings.host, settings.port)
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    from .process_memory import prepare_serving_process

    prepare_serving_process(settings)  # before any thread allocates and before transformers imports torch._dynamo

    import uvicorn

    from .api.app import create_app

    prepare_process(settings)
    registry = build_registry(settings)
    app = create_app(settings, registry)
    logger.info("quantserve: serving %s on http://%s:%d (OpenAI API at /v1, health at /health)",
                ", ".join(catalog.names()), settings.host, settings.port)
    from .api.connections import header_timeout_protocol

    # h11 (uvicorn's pure-Python protocol, whichever else is installed) with a deadline on each
    # request's headers; its header block is capped at h11's 16 KiB (400 beyond); the body's
    # deadline and size are the app's guards (api/guards.py).
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.shutdown_timeout,
                            http=header_timeout_protocol(settings.header_timeout))
    server = _graceful_server_class()(config, Watchdog(registry))
    try:
        server.run()
    except SystemExit:
        if server.started:
            raise
        # uvicorn's own startup failed after our checks (it logged why): still one line last.
        return _fail(f"cannot listen on {settings.host}:{settings.port} (see the log above)")
    if server.watchdog.failure is not None:
        return _fail(server.watchdog.failure)
    return 0


def _check_listen(host: str, port: int) -> None:
    """Bind every address uvicorn will (and let go): a taken port or an unknown host is an error
    now rather than after the model has started loading. uvicorn sets SO_REUSEADDR too."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in infos:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _fail(reason: str) -> int:
    # One line, last on stderr (after uvicorn's shutdown messages): what a supervisor's log shows.
    line = " ".join(reason.split()) or "unknown error"
    print(f"quantserve serve: error: {line}", file=sys.stderr, flush=True)
    return 1


class Watchdog:
    """Decides when a serving process must stop: the model failed to load (stop now), or an engine
    thread died (stop after `grace` seconds, in which /health and new requests answer 503 with the
    reason and the requests the engine failed get their error responses written)."""

    def __init__(self, registry: Any, grace: float = 1.5) -> None:
        self.registry = registry
        self.grace = grace
        self.failure: Optional[str] = None
        self._dead_since: Optional[float] = None

    def should_stop(self, now: float) -> bool:
        reg = self.registry
        if reg.state == "failed":
            self.failure = reg.error or "loading the model failed"
            return True
        if reg.state != "ready":  # loading, or stopping for another reason
            return False
        serving, reason = reg.health()
        if serving:
            return False
        if self._dead_since is None:
            self._dead_since, self.failure = now, reason
            logger.error("not serving: %s; exiting in %.1f s (status 1) so that a supervisor restarts the server",
                         reason, self.grace)
        return now - self._dead_since >= self.grace


# After a failure nothing is left to drain: the engine has already failed its requests.
_FAILURE_SHUTDOWN_TIMEOUT = 5.0
_WATCH_INTERVAL = 0.1


def _drain_margin(limit: float) -> float:
    """How long before the drain limit runs out the engine fails what is still running (see
    GracefulServer.shutdown): a quarter of the limit, 1 to 5 s (a step on a busy CPU can take a second)."""
    return min(max(limit / 4, 1.0), 5.0)


def _graceful_server_class() -> type:
    import uvicorn  # imported only when serving

    class GracefulServer(uvicorn.Server):
        """uvicorn with two changes. uvicorn re-raises SIGTERM/SIGINT after its graceful
        shutdown, so the process dies by the signal (exit 143); a server that drained its
        requests on SIGTERM has succeeded: exit 0. And a Watchdog task stops the server (as
        SIGTERM would) when the model fails to load or the engine dies."""

        def __init__(self, config: Any, watchdog: Watchdog) -> None:
            super().__init__(config)
            self.watchdog = watchdog

        async def serve(self, sockets: Any = None) -> None:
            watch = asyncio.create_task(self._watch())
            try:
                await super().serve(sockets)
            finally:
                watch.cancel()

        async def shutdown(self, sockets: Any = None) -> None:
            # When the drain limit (--shutdown-timeout) runs out, uvicorn cancels the requests
            # still running: a 500 and a traceback, or a stream cut without an end. A moment
            # before that the engine fails them instead, so each gets a 503 with Retry-After (an
            # error event and [DONE] if streaming) and its KV blocks back.
            limit = self.config.timeout_graceful_shutdown
            timer = None
            if limit is not None:
                timer = asyncio.get_running_loop().call_later(
                    max(limit - _drain_margin(limit), 0.0), self.watchdog.registry.fail_unfinished,
                    f"the server is shutting down and its drain limit ({limit:g} s) ran out")
            try:
                await super().shutdown(sockets)
            finally:
                if timer is not None:
                    timer.cancel()

        async def _watch(self) -> None:
            while not self.should_exit:
                if self.watchdog.should_stop(time.monotonic()):
                    limit = self.config.timeout_graceful_shutdown
                    self.config.timeout_graceful_shutdown = (
                        _FAILURE_SHUTDOWN_TIMEOUT if limit is None else min(limit, _FAILURE_SHUTDOWN_TIMEOUT))
                    self.should_exit = True
                    return
                await asyncio.sleep(_WATCH_INTERVAL)

        def capture_signals(self):  # type: ignore[override]
            context = super().capture_signals()

            class _NoReraise:
                def __enter__(inner):
                    return context.__enter__()

                def __exit__(inner, *exc):
                    self._captured_signals.clear()
                    return context.__exit__(*exc)

            return _NoReraise()

    return GracefulServer
