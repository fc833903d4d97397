"""Offline checks of the deployment variants in deploy/ against the root prefect.yaml; no server,
cluster or Docker daemon is contacted.

    python deploy/check_variants.py            # from the project folder

Always: both files parse; they have the root file's top-level name, version and pull steps, the same
deployments (names, entrypoints, descriptions, parameters, schedules, concurrency limits) in the same order,
the cpu pool unchanged, and the gpu pool keeps its name and queue and has job_variables.
When prefect-kubernetes / prefect-docker are importable (they are not project dependencies): the gpu
job_variables, with `{{ $VAR }}` filled in as `prefect deploy` would, validate against the pool's
variables schema and render through the worker's own job configuration class, and the rendered job
asks for one GPU and mounts the shared folders at the paths the cpu host uses."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import sys
from pathlib import Path

import yaml

os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "false")  # never start a server here

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VARIANTS = {"kubernetes": HERE / "prefect.kubernetes.yaml", "docker": HERE / "prefect.docker.yaml"}
SAMPLE_ENV = {"DOCTUNE_ROOT": "/srv/doctune", "PREFECT_LOCAL_STORAGE_PATH": "/srv/doctune/.prefect/storage",
              "DOCTUNE_IMAGE": "doctune-gpu:check"}
SAME_KEYS = ("entrypoint", "description", "parameters", "schedules", "concurrency_limit")


def load(path: Path) -> dict:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def structural(root: dict, variant: dict, kind: str) -> list[str]:
    errors = []
    for key in ("name", "prefect-version", "pull"):
        if variant.get(key) != root.get(key):
            errors.append(f"{kind}: top-level {key!r} differs from prefect.yaml")
    names = [d["name"] for d in root["deployments"]]
    got = [d["name"] for d in variant["deployments"]]
    if got != names:
        return errors + [f"{kind}: deployments {got} != {names}"]
    for ours, theirs in zip(root["deployments"], variant["deployments"]):
        for key in SAME_KEYS:
            if ours.get(key) != theirs.get(key):
                errors.append(f"{kind}: {ours['name']}.{key} differs from prefect.yaml")
        pool, vpool = ours["work_pool"], theirs["work_pool"]
        if pool["name"] == "cpu" and vpool != pool:
            errors.append(f"{kind}: {ours['name']} must keep the cpu pool unchanged")
        if pool["name"] == "gpu":
            if {k: vpool.get(k) for k in pool} != pool:
                errors.append(f"{kind}: {ours['name']} must keep the gpu pool's name and queue")
            if not vpool.get("job_variables"):
                errors.append(f"{kind}: {ours['name']} has no job_variables")
    return errors


class _NoClient:
    """Stands in for a Prefect client: the templates hold no block or variable references."""


def gpu_job_variables(variant: dict) -> dict:
    from prefect.utilities.templating import apply_values

    saved = {k: os.environ.get(k) for k in SAMPLE_ENV}
    os.environ.update(SAMPLE_ENV)  # `{{ $VAR }}` is always read from os.environ, as in `prefect deploy`
    try:
        filled = apply_values(copy.deepcopy(variant), {}, remove_notset=False)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    [jv] = {json.dumps(d["work_pool"]["job_variables"], sort_keys=True)
            for d in filled["deployments"] if d["work_pool"]["name"] == "gpu"}
    return json.loads(jv)


def render(config_cls, template: dict, job_variables: dict):
    import jsonschema

    jsonschema.validate(job_variables, template["variables"])
    return asyncio.run(config_cls.from_template_and_values(template, job_variables, client=_NoClient()))


def check_kubernetes(variant: dict) -> list[str]:
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads((HERE / "gpu-pool.kubernetes.json").read_text(encoding="utf-8"))
    config = render(KubernetesWorkerJobConfiguration, template, gpu_job_variables(variant))
    pod = config.job_manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
    want = {f"{SAMPLE_ENV['DOCTUNE_ROOT']}/outputs", SAMPLE_ENV["PREFECT_LOCAL_STORAGE_PATH"]}
    errors = []
    if container["resources"]["limits"].get("nvidia.com/gpu") != 1:
        errors.append("kubernetes: the job does not ask for nvidia.com/gpu: 1")
    if not want <= mounts:
        errors.append(f"kubernetes: mounts {sorted(mounts)} lack {sorted(want - mounts)}")
    if not any("persistentVolumeClaim" in v for v in pod.get("volumes", [])):
        errors.append("kubernetes: no persistentVolumeClaim volume")
    if container["image"] != SAMPLE_ENV["DOCTUNE_IMAGE"] or config.env.get("HF_HUB_OFFLINE") != "1":
        errors.append("kubernetes: image or env not rendered")
    return errors


def check_docker(variant: dict) -> list[str]:
    from docker.models.containers import _create_container_args
    from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration

    template = DockerWorker.get_default_base_job_template()
    config = render(DockerWorkerJobConfiguration, template, gpu_job_variables(variant))
    root, storage = SAMPLE_ENV["DOCTUNE_ROOT"], SAMPLE_ENV["PREFECT_LOCAL_STORAGE_PATH"]
    errors = []
    for want in (f"{root}/outputs:{root}/outputs", f"{storage}:{storage}"):
        if want not in config.volumes:
            errors.append(f"docker: volume {want} missing")
    kwargs = dict(config.container_create_kwargs or {})
    # What the worker hands docker-py's containers.create (API 1.40+ has device_requests); raises on a bad key.
    created = _create_container_args(
        {"image": config.image, "version": "1.44", "volumes": config.volumes, "environment": config.env, **kwargs})
    requests = created["host_config"].get("DeviceRequests") or []
    if not any(["gpu"] in r["Capabilities"] for r in requests):
        errors.append("docker: no GPU device request")
    if config.env.get("HF_HUB_OFFLINE") != "1":
        errors.append("docker: env not rendered")
    return errors


def main() -> int:
    root = load(ROOT / "prefect.yaml")
    errors, skipped = [], []
    for kind, path in VARIANTS.items():
        variant = load(path)
        errors += structural(root, variant, kind)
        try:
            errors += {"kubernetes": check_kubernetes, "docker": check_docker}[kind](variant)
        except ImportError as exc:
            skipped.append(f"{kind} rendering skipped ({exc.name} not installed)")
    for line in skipped:
        print(line)
    for line in errors:
        print("FAIL", line)
    print("variants: OK" if not errors else f"variants: {len(errors)} problem(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
