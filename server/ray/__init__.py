"""quantserve on Ray Serve: replicas of the whole server behind a prefix-aware router.

    pip install "quantserve[ray]"
    serve run quantserve.server.ray:build_app model=org/name num_replicas=2
    serve run deploy/ray/serve.yaml            # the same as a config file (KubeRay's RayService too)

Ray is imported only here (build_app) and in the replicas, never by `quantserve serve`."""

from __future__ import annotations

from typing import Any, Mapping


def build_app(args: Mapping[str, Any]) -> Any:
    """Ray Serve application builder: `args` are `quantserve serve`'s options by their Settings
    names, plus the deployment's (see server/ray/args.py). ValueError for a bad argument."""
    from .args import parse_app_args

    parsed = parse_app_args(args, gpu_available=_gpu_available)
    from .deployment import make_application

    return make_application(parsed)


def _gpu_available() -> bool:
    """A GPU for each replica by default where the cluster (or, before Ray starts, this machine) has one."""
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    import torch

    return torch.cuda.is_available()
