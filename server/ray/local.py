"""A Ray Serve application on this machine, for tests and benchmarks (as server/testing.py's
ServerProcess is for `quantserve serve`): a new local Ray instance, never one already running."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Optional

APP_NAME = "quantserve"
REPLICA_DEPLOYMENT = "QuantserveReplica"


@contextlib.contextmanager
def local_app(args: Mapping[str, Any], num_cpus: int = 4, port: Optional[int] = None,
              object_store_bytes: int = 150 * 2**20) -> Iterator[str]:
    """Ray started (its own local instance: num_cpus logical CPUs, no dashboard, a small object
    store), build_app(args) running on 127.0.0.1:`port` (a free one by default) and ready; yields
    its URL; Serve and Ray shut down on the way out."""
    import ray
    from ray import serve

    from ..testing import free_port
    from . import build_app

    port = port or free_port()
    app = build_app(args)  # a bad argument fails before Ray starts
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, object_store_memory=object_store_bytes,
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def kill_replica(unique_id: str) -> None:
    """Kill one replica's actor as a crash would (no drain, no __del__); Ray starts another."""
    import ray

    actor = ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{REPLICA_DEPLOYMENT}#{unique_id}", namespace="serve")
    ray.kill(actor, no_restart=True)


def replica_ids() -> list[str]:
    """The live replicas' ids (what x-quantserve-replica names; a request carrying one goes there)."""
    import ray

    prefix = f"SERVE_REPLICA::{APP_NAME}#{REPLICA_DEPLOYMENT}#"
    names = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"][len(prefix):] for a in names if a["namespace"] == "serve" and a["name"].startswith(prefix))
