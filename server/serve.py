"""`quantserve serve [MODEL]`: flags generated from Settings (one source of truth), then uvicorn."""

from __future__ import annotations

import argparse
import logging
import types
import typing
from typing import Any, Optional

from pydantic import SecretStr

from .config import Settings

logger = logging.getLogger("quantserve.server")


def _flag_type(annotation: Any) -> tuple[Any, Optional[list[str]], bool]:
    """(argparse type, choices, is_list) for a Settings field annotation."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _flag_type(args[0])
    if origin is typing.Literal:
        return str, [str(a) for a in typing.get_args(annotation)], False
    if origin is list:
        return str, None, True
    if annotation is SecretStr:
        return str, None, False
    return annotation, None, False


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        description = (field.description or "").replace("%%", "%")
        env = f"QUANTSERVE_{name.upper()}"
        if name == "model":
            parser.add_argument("model", nargs="?", default=argparse.SUPPRESS, metavar="MODEL",
                                help=f"{description} [env {env}]")
            continue
        flag = "--" + name.replace("_", "-")
        kind, choices, is_list = _flag_type(field.annotation)
        default = field.get_default(call_default_factory=True)
        shown = "" if default in (None, []) else f"; default {default}"
        help_text = f"{description} [env {env}{shown}]".replace("%", "%%")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif is_list:
            parser.add_argument(flag, nargs="+", default=argparse.SUPPRESS, metavar="VALUE", help=help_text)
        else:
            parser.add_argument(flag, type=kind, choices=choices, default=argparse.SUPPRESS, help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags given on the command line override QUANTSERVE_* variables, which override defaults."""
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    return Settings(**given)


def load_served_model(settings: Settings) -> Any:
    """Load the model (quantized) and build its engine: the registry's loader."""
    import torch

    from .engine import AsyncEngine, EngineConfig
    from .loading.loader import load_for_serving
    from .api.registry import ServedModel

    # Process-wide, as torch has it: this process serves one model.
    torch.set_float32_matmul_precision(settings.matmul_precision)
    logger.info("float32 matmul precision: %s%s", settings.matmul_precision,
                " (bf16 products where the CPU has AVX-512-BF16)" if settings.matmul_precision == "medium" else "")
    loaded = load_for_serving(settings)
    config = EngineConfig.from_settings(settings, loaded.model)
    engine = AsyncEngine(loaded.model, loaded.tokenizer, config)
    return ServedModel(
        name=settings.display_name(),
        engine=engine,
        tokenizer=loaded.tokenizer,
        max_model_len=engine.max_model_len,
        load_report=loaded.report,
    )


def run(settings: Settings) -> int:
    import uvicorn

    from .api.app import create_app
    from .api.registry import Registry

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry = Registry(lambda: load_served_model(settings))
    app = create_app(settings, registry)
    logger.info("quantserve: serving %s on http://%s:%d (OpenAI API at /v1, health at /health)",
                settings.display_name(), settings.host, settings.port)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.shutdown_timeout)
    _graceful_server_class()(config).run()
    return 0


def _graceful_server_class() -> type:
    import uvicorn  # imported only when serving

    class GracefulServer(uvicorn.Server):
        """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, so the process dies by the
        signal (exit 143). A server that drained its requests on SIGTERM has succeeded: exit 0."""

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

