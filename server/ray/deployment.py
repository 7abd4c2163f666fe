"""The Ray Serve application: an ingress deployment that reads each HTTP request and hands it to a
QuantserveReplica through a handle, whose request router (PrefixAwareRouter by default) picks the
replica; each replica is a whole quantserve server (its engine and the same FastAPI app, every
route) that answers the request in-process and streams the response back. Nothing in the engine
or the app knows about Ray."""

# No `from __future__ import annotations`: FastAPI must see `request: Request` as the class
# through Ray Serve's class-based view, not as a string it cannot resolve.
import asyncio
import logging
from typing import Any, AsyncIterator, Optional

import ray
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import (BackPressureError, DeploymentUnavailableError, RayServeException,
                                  ReplicaUnavailableError)
from ray.serve.handle import DeploymentHandle

from .args import AppArgs
from .forward import (REPLICA_HEADER, Accepted, ForwardedRequest, Head, error_response, prompt_text,
                      serve_forwarded, stream_error_event)

logger = logging.getLogger("quantserve.server")

_RETRIES = 2  # a request no replica has begun answering is sent again this many times
_RETRY_AFTER_S = 2  # what a 503 tells the client (a dead replica is replaced in about a model load)


class QuantserveReplica:
    """One replica: `quantserve serve`'s model, engine and FastAPI app in a Ray actor. Ready (Ray
    routes to it) once the model has loaded; unhealthy (Ray replaces it) once the engine died."""

    async def __init__(self, settings: dict[str, Any]) -> None:  # Ray Serve awaits an async constructor
        from ..api.app import create_app
        from ..config import Settings
        from ..process_memory import prepare_serving_process
        from ..serve import build_registry, prepare_process

        config = Settings(**settings)
        logging.getLogger("quantserve").setLevel(config.log_level.upper())
        prepare_serving_process(config)
        prepare_process(config)
        self.registry = build_registry(config)
        self.app = create_app(config, self.registry)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # starts loading in a thread
        while self.registry.state == "loading":
            await asyncio.sleep(0.1)
        if self.registry.state != "ready":  # Ray retries the replica, then marks the deployment unhealthy
            raise RuntimeError(f"loading the model failed: {self.registry.error}")

    async def handle(self, request: ForwardedRequest) -> AsyncIterator[Any]:
        async for frame in serve_forwarded(self.app, request, self.replica):
            yield frame

    def check_health(self) -> None:
        serving, reason = self.registry.health()
        if not serving:
            raise RuntimeError(reason)

    async def __del__(self) -> None:
        # Ray calls this after draining (graceful_shutdown_timeout_s): stop the engine cleanly.
        lifespan = getattr(self, "_lifespan", None)
        if lifespan is not None:
            self._lifespan = None
            await lifespan.__aexit__(None, None, None)


# The ingress's helpers come before it: serve.ingress captures the class when it is defined.
async def _rest(stream: Any, head: Head) -> AsyncIterator[bytes]:
    """The body after the head's chunk; a replica that dies meanwhile ends an event stream in-band."""
    try:
        if head.body:
            yield head.body
        async for chunk in stream:
            yield chunk
    except Exception as exc:  # noqa: BLE001
        if not _replica_gone(exc):
            raise
        logger.warning("replica died mid-response: %s", type(exc).__name__)
        if (head.header("content-type") or "").startswith("text/event-stream"):
            yield stream_error_event("The replica serving this stream stopped; retry the request.")
    finally:
        stream.cancel()  # a no-op once finished; the client gone: the replica aborts the request


def _replica_gone(exc: BaseException) -> bool:
    gone = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ReplicaUnavailableError,
            DeploymentUnavailableError)
    if isinstance(exc, gone):
        return True
    return isinstance(exc, RayServeException) and isinstance(exc.__cause__, gone)


def _header_dict(head: Head) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers if k.lower() != b"content-length"}


def _response(head: Head) -> Response:
    response = Response(content=head.body, status_code=head.status)
    response.raw_headers = [(k.lower(), v) for k, v in head.headers if k.lower() != b"content-length"] + [
        (b"content-length", str(len(head.body)).encode())]
    return response


ingress_app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


@serve.ingress(ingress_app)
class QuantserveIngress:
    """Reads a request (body included), forwards it to a replica and streams the answer back. A
    replica that dies before answering: the request goes to another (twice at most), then 503 with
    Retry-After; one that dies mid-stream: the stream ends with an error event and [DONE]. No
    replica takes the request within assign_timeout_s (all gone, none ready): 503, not a hang."""

    def __init__(self, replicas: DeploymentHandle, assign_timeout_s: float = 30.0) -> None:
        self.replicas = replicas.options(stream=True, method_name="handle")
        self.assign_timeout_s = assign_timeout_s

    @ingress_app.api_route("/{path:path}", methods=_METHODS)
    async def forward(self, request: Request) -> Response:
        scope = request.scope
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        body = await request.body()
        forwarded = ForwardedRequest(
            method=request.method, path=path, query_string=scope.get("query_string", b""),
            headers=list(scope.get("headers", [])), body=body,
            client=tuple(scope["client"]) if scope.get("client") else None,
            prompt=prompt_text(body) if request.method == "POST" else "",
            replica=request.headers.get(REPLICA_HEADER))
        for attempt in range(_RETRIES + 1):
            stream = self.replicas.remote(forwarded)
            try:
                accepted = await asyncio.wait_for(stream.__anext__(), self.assign_timeout_s)
                assert isinstance(accepted, Accepted)
                head = await stream.__anext__()
            except asyncio.TimeoutError:
                stream.cancel()
                return _response(error_response(
                    503, f"No replica took the request within {self.assign_timeout_s:g} s; retry later.",
                    "no_replica", _RETRY_AFTER_S))
            except BackPressureError:
                return _response(error_response(503, "Every replica's queue is full; retry later.", "overloaded",
                                                _RETRY_AFTER_S))
            except Exception as exc:  # noqa: BLE001 - sorted below: a replica gone, or a bug
                stream.cancel()
                if not _replica_gone(exc):
                    logger.exception("forwarding %s %s failed", request.method, path)
                    return _response(error_response(500, "Internal server error in the ingress; this is a bug "
                                                    "in quantserve.", "internal_error"))
                logger.warning("replica gone before answering %s %s (attempt %d): %s", request.method, path,
                               attempt + 1, type(exc).__name__)
                if attempt < _RETRIES:
                    await asyncio.sleep(0.5 * (attempt + 1))  # Ray's router learns of the death meanwhile
                    continue
                return _response(error_response(503, "The replica serving this request stopped; retry.",
                                                "replica_died", _RETRY_AFTER_S))
            break
        assert isinstance(head, Head)
        if not head.more:
            return _response(head)
        return StreamingResponse(_rest(stream, head), status_code=head.status,
                                 headers=_header_dict(head), media_type=None)


def router_config(args: AppArgs) -> Optional[RequestRouterConfig]:
    if args.request_router == "pow2":
        return None  # Ray Serve's default: power of two choices
    if args.request_router == "prefix":
        from .router import PrefixAwareRouter

        return RequestRouterConfig(request_router_class=PrefixAwareRouter,
                                   request_router_kwargs={"max_imbalance": args.router_max_imbalance})
    return RequestRouterConfig(request_router_class=args.request_router)


def make_application(args: AppArgs) -> Any:
    """The bound application: QuantserveIngress(QuantserveReplica) with the deployments' options."""
    options: dict[str, Any] = dict(
        ray_actor_options=args.ray_actor_options, max_ongoing_requests=args.max_ongoing_requests,
        graceful_shutdown_timeout_s=args.graceful_shutdown_timeout_s,
        health_check_period_s=5, health_check_timeout_s=30,
    )
    if args.autoscaling_config:
        options["autoscaling_config"] = args.autoscaling_config
    else:
        options["num_replicas"] = args.num_replicas
    config = router_config(args)
    if config is not None:
        options["request_router_config"] = config
    replica = serve.deployment(QuantserveReplica, name="QuantserveReplica").options(**options)
    # The ingress only forwards bytes: one replica, a fraction of a CPU, no limit worth hitting.
    ingress = serve.deployment(QuantserveIngress, name="QuantserveIngress").options(
        num_replicas=1, max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
    return ingress.bind(replica.bind(args.settings), assign_timeout_s=args.assign_timeout_s)
