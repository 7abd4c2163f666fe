"""The Ray Serve application builder's arguments, read and checked before anything starts (no Ray
imported here): `serve run quantserve.server.ray:build_app model=... num_replicas=2` hands them
over as strings, a serve config file or KubeRay's RayService as YAML values.

Any `quantserve serve` option by its Settings name (`quant`, `max_model_len`, `api_key`; dashes
accepted), plus the deployment's own: num_replicas or autoscaling_config, ray_actor_options,
max_ongoing_requests, request_router (prefix | pow2 | a RequestRouter class's import path),
router_max_imbalance, assign_timeout_s, graceful_shutdown_timeout_s."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Callable, Mapping, Optional, Union

from ..config import Settings

# Ray Serve's proxy owns the port (serve config http_options); a replica listens on nothing.
_NOT_IN_RAY = {"host": "Ray Serve's proxy listens: set http_options.host in the serve config",
               "port": "Ray Serve's proxy listens: set http_options.port in the serve config"}
ROUTERS = ("prefix", "pow2")


@dataclasses.dataclass(frozen=True)
class AppArgs:
    settings: dict[str, Any]  # Settings keyword arguments as given (each replica builds Settings from them)
    num_replicas: Union[int, str, None] = 1
    autoscaling_config: Optional[dict[str, Any]] = None
    ray_actor_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_ongoing_requests: int = 64
    request_router: str = "prefix"
    router_max_imbalance: int = 8
    assign_timeout_s: float = 30.0
    graceful_shutdown_timeout_s: float = 60.0

    def make_settings(self) -> Settings:
        return Settings(**self.settings)


def parse_app_args(args: Mapping[str, Any], gpu_available: Optional[Callable[[], bool]] = None) -> AppArgs:
    """ValueError naming the argument for anything unknown or out of range. `gpu_available`:
    whether replicas get a GPU by default (asked only when ray_actor_options is not given)."""
    given = {str(k).replace("-", "_"): v for k, v in dict(args or {}).items()}
    own = {f.name for f in dataclasses.fields(AppArgs)} - {"settings"}
    settings_kw: dict[str, Any] = {}
    deploy: dict[str, Any] = {}
    for key, value in given.items():
        if key in _NOT_IN_RAY:
            raise ValueError(f"{key}: {_NOT_IN_RAY[key]}")
        if key in own:
            deploy[key] = value
        elif key in Settings.model_fields:
            settings_kw[key] = _setting_value(key, value)
        else:
            raise ValueError(f"unknown argument {key!r}: not a `quantserve serve` option (Settings field) nor one "
                             f"of {', '.join(sorted(own))}")

    if "num_replicas" in deploy and "autoscaling_config" in deploy:
        raise ValueError("give num_replicas or autoscaling_config, not both")
    autoscaling = _mapping("autoscaling_config", deploy.get("autoscaling_config"))
    num_replicas: Union[int, str, None] = None if autoscaling else 1
    if "num_replicas" in deploy:
        num_replicas = "auto" if deploy["num_replicas"] == "auto" else _int("num_replicas", deploy["num_replicas"], 1)
    router = str(deploy.get("request_router", "prefix"))
    if router not in ROUTERS and "." not in router:
        raise ValueError(f"request_router: {router!r} is none of {', '.join(ROUTERS)} nor a class's import path")

    actor_options = _mapping("ray_actor_options", deploy.get("ray_actor_options")) or {}
    wants_cpu = str(settings_kw.get("device") or "").startswith("cpu")
    if not actor_options:
        gpu = not wants_cpu and gpu_available is not None and gpu_available()
        actor_options = {"num_gpus": 1} if gpu else {"num_cpus": int(settings_kw.get("cpu_threads") or 1)}
    num_cpus = actor_options.get("num_cpus")
    if "cpu_threads" not in settings_kw and not actor_options.get("num_gpus") and num_cpus and num_cpus >= 1:
        settings_kw["cpu_threads"] = int(num_cpus)  # as many compute threads as CPUs the replica reserved

    parsed = AppArgs(
        settings=settings_kw, num_replicas=num_replicas, autoscaling_config=autoscaling,
        ray_actor_options=actor_options,
        max_ongoing_requests=_int("max_ongoing_requests", deploy.get("max_ongoing_requests", 64), 1),
        request_router=router,
        router_max_imbalance=_int("router_max_imbalance", deploy.get("router_max_imbalance", 8), 0),
        assign_timeout_s=_float("assign_timeout_s", deploy.get("assign_timeout_s", 30.0)),
        graceful_shutdown_timeout_s=_float("graceful_shutdown_timeout_s", deploy.get("graceful_shutdown_timeout_s", 60.0)),
    )
    try:
        parsed.make_settings()  # refused now, naming the option, rather than in every replica
    except Exception as exc:  # pydantic's ValidationError: one message per field
        raise ValueError(f"invalid quantserve options: {exc}") from None
    return parsed


def _setting_value(key: str, value: Any) -> Any:
    """A CLI string for a list option: JSON ('["a", "b"]') or words separated by spaces/commas."""
    annotation = Settings.model_fields[key].annotation
    if isinstance(value, str) and typing.get_origin(annotation) is list:
        if value.lstrip().startswith("["):
            return json.loads(value)
        return [v for v in value.replace(",", " ").split() if v]
    return value


def _mapping(name: str, value: Any) -> Optional[dict[str, Any]]:
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            loaded = json.loads(value)
        except ValueError:
            loaded = None
        if isinstance(loaded, dict):
            return loaded
    raise ValueError(f"{name}: expected a mapping (YAML, or JSON on the command line), got {value!r}")


def _int(name: str, value: Any, minimum: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected an integer, got {value!r}") from None
    if number < minimum or isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{name}: expected an integer of at least {minimum}, got {value!r}")
    return number


def _float(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number of seconds, got {value!r}") from None
    if not number > 0:
        raise ValueError(f"{name}: expected a positive number of seconds, got {value!r}")
    return number
