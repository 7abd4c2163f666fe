"""deploy/: the Ray Serve config, the KubeRay RayService, the plain Deployment + Service and the
InferencePool example, checked without a cluster: each parses, Ray's own schema accepts the serve
configs, their arguments pass quantserve's builder and `serve` parser, and the fields a cluster
acts on agree with the image and the server (image tags, probes on /health at the container's
port, GPU requests, the model-cache volume, the drain time)."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from quantserve.server.config import Settings
from quantserve.server.ray.args import parse_app_args
from quantserve.server.serve import add_serve_arguments, settings_from_args

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
# Ray's schema module warns about its own pydantic usage on import.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CACHE = "/home/quantserve/.cache"  # the Dockerfile's VOLUME: HF_HOME and quantserve's caches are under it


def _docs(path: Path) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}


def _check_serve_config(config: dict) -> dict:
    """Ray's schema accepts it; the one application is build_app with arguments build_app accepts."""
    try:
        from ray.serve.schema import ServeDeploySchema
    except ImportError:
        ServeDeploySchema = None  # the ray extra is optional: the rest still runs
    if ServeDeploySchema is not None:
        ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "quantserve.server.ray:build_app"
    assert app["route_prefix"] == "/"
    parsed = parse_app_args(app["args"], gpu_available=lambda: True)
    assert parsed.ray_actor_options["num_gpus"] == 1
    assert parsed.make_settings().model == app["args"]["model"]
    return app["args"]


def test_ray_serve_config():
    config = yaml.safe_load((DEPLOY / "ray" / "serve.yaml").read_text())
    args = _check_serve_config(config)
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert args["num_replicas"] == 2 and "autoscaling_config" not in args


def test_ray_image_dockerfile():
    text = (DEPLOY / "ray" / "Dockerfile").read_text()
    assert re.search(rf"^FROM quantserve:{re.escape(VERSION)}$", text, re.M)
    ray_pin = re.search(r'"ray\[serve\]==([\d.]+)"', text).group(1)
    assert _docs(DEPLOY / "kubernetes" / "rayservice.yaml")["RayService"]["spec"]["rayClusterConfig"][
        "rayVersion"] == ray_pin
    exe = shutil.which("hadolint", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is not None:
        proc = subprocess.run([exe, "--config", str(REPO / ".hadolint.yaml"), str(DEPLOY / "ray" / "Dockerfile")],
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def _container(pod_spec: dict) -> dict:
    (container,) = pod_spec["containers"]
    return container


def _mounts_cache(pod_spec: dict, claims: set[str]) -> None:
    (mount,) = [m for m in _container(pod_spec)["volumeMounts"] if m["mountPath"] == CACHE]
    (volume,) = [v for v in pod_spec["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] in claims


def _gpu(resources: dict) -> int:
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    # An extended resource must be requested and limited alike (Kubernetes refuses otherwise).
    assert requests.get("nvidia.com/gpu") == limits.get("nvidia.com/gpu")
    return int(limits.get("nvidia.com/gpu", 0))


def test_rayservice():
    docs = _docs(DEPLOY / "kubernetes" / "rayservice.yaml")
    service = docs["RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    args = _check_serve_config(serve_config)
    assert "autoscaling_config" in args and "num_replicas" not in args
    cluster = service["spec"]["rayClusterConfig"]
    claims = {docs["PersistentVolumeClaim"]["metadata"]["name"]}
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"  # replicas go to the GPU workers
    head_container = _container(head["template"]["spec"])
    assert head_container["image"] == f"quantserve-ray:{VERSION}"
    assert {"name": "serve", "containerPort": serve_config["http_options"]["port"]} in head_container["ports"]
    _mounts_cache(head["template"]["spec"], claims)
    (workers,) = cluster["workerGroupSpecs"]
    worker = _container(workers["template"]["spec"])
    assert worker["image"] == f"quantserve-ray:{VERSION}"
    # One replica per worker pod: the pod's GPUs and CPUs are one replica's ray_actor_options.
    assert _gpu(worker["resources"]) == args["ray_actor_options"]["num_gpus"]
    assert int(worker["resources"]["requests"]["cpu"]) >= args["ray_actor_options"]["num_cpus"]
    assert workers["maxReplicas"] >= args["autoscaling_config"]["max_replicas"]
    _mounts_cache(workers["template"]["spec"], claims)


def test_plain_deployment_and_service():
    docs = _docs(DEPLOY / "kubernetes" / "deployment.yaml")
    deployment, service = docs["Deployment"], docs["Service"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    container = _container(pod["spec"])
    assert container["image"] == f"quantserve:{VERSION}"
    env = {e["name"]: e.get("value") for e in container["env"]}
    (port,) = container["ports"]
    assert port["containerPort"] == int(env["QUANTSERVE_PORT"]) and env["QUANTSERVE_HOST"] == "0.0.0.0"
    # The arguments are `quantserve serve`'s (the image's entrypoint), read by its own parser.
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    settings = settings_from_args(parser.parse_args(container["args"]))
    assert settings.quant == "nf4"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": port["name"]}
    # The model loads under the startup probe: minutes, not the seconds readiness allows.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert _gpu(container["resources"]) == 1
    assert container["resources"]["requests"]["memory"] == container["resources"]["limits"]["memory"]
    _mounts_cache(pod["spec"], {docs["PersistentVolumeClaim"]["metadata"]["name"]})
    # SIGTERM drains for --shutdown-timeout; the kubelet must wait longer before SIGKILL.
    assert pod["spec"]["terminationGracePeriodSeconds"] > Settings.model_fields["shutdown_timeout"].default
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == port["name"] and service_port["port"] == port["containerPort"]


def test_inference_pool():
    docs = _docs(DEPLOY / "kubernetes" / "inferencepool.yaml")
    plain = _docs(DEPLOY / "kubernetes" / "deployment.yaml")["Deployment"]
    pool, route = docs["InferencePool"], docs["HTTPRoute"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    pod_labels = plain["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    container_ports = {p["containerPort"] for p in _container(plain["spec"]["template"]["spec"])["ports"]}
    assert {p["number"] for p in pool["spec"]["targetPorts"]} <= container_ports
    assert pool["spec"]["endpointPickerRef"]["name"]
    (rule,) = route["spec"]["rules"]
    (backend,) = rule["backendRefs"]
    assert backend == {"group": "inference.networking.k8s.io", "kind": "InferencePool",
                       "name": pool["metadata"]["name"]}
