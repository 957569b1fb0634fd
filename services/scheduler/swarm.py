"""Docker Swarm worker backend: one replicated service per checkpoint, ``sd_<model_key>``.

Spoken to through the Docker Engine API of a Swarm manager (over its unix socket or TCP)
with aiohttp; every path carries the API version (``/v1.44/services/...``). The services
it owns carry the label ``sdswarm.model_key``; reconciling lists them by that label, so a
new leader picks up exactly where the last one left off and every step is idempotent:

- first demand for a checkpoint creates its service (image, worker settings as env, GPU
  generic resources, CPU/memory limits from the function settings, mounts, networks,
  placement constraints);
- later, ``Mode.Replicated.Replicas`` is updated at the service's current
  ``Version.Index`` (the ``version`` query parameter: a concurrent change makes the update
  fail instead of being lost);
- idle checkpoints are scaled to 0 and keep their service; deleted ones are removed;
- a change of the desired task template (a new image or env through the functions API)
  is detected by the hash in label ``sdswarm.spec`` and rolled out by the same update;
- connection secrets stay Docker secrets: a setting the scheduler reads from a file
  (``SDSWARM_<NAME>_FILE``) is passed on as that file name, with the secret attached
  (``swarm_secrets``), never as a plain value in the service's env.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from proto import ModelStatus, names
from proto.workers import WorkerStatus
from services.common.settings import FILE_SUFFIX, PREFIX, StoreSettings
from services.scheduler.local import worker_settings
from services.scheduler.settings import SchedulerSettings
from services.storage.mongo import Document

log = logging.getLogger(__name__)
KEY_LABEL = "sdswarm.model_key"
STACK_LABEL = "com.docker.stack.namespace"
"""What ``docker stack rm`` and ``docker stack services`` find a stack's services by."""
SPEC_LABEL = "sdswarm.spec"
STOP_GRACE_NS = 30 * 10**9
"""Docker's grace between SIGTERM and SIGKILL: the worker finishes or hands back its task."""
HEALTH_INTERVAL_NS = 30 * 10**9
"""How often Swarm runs a worker's healthcheck: a hung worker goes within this of the limit."""
_SCHEDULER_ONLY = {
    PREFIX + name.upper()
    for name in SchedulerSettings.__struct_fields__
    if name not in StoreSettings.__struct_fields__
}


class DockerError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Docker Engine API {status}: {message}")
        self.status = status


def _mount(spec: str) -> dict[str, Any]:
    source, target, *options = spec.split(":")
    return {
        "Type": "bind" if source.startswith("/") else "volume",
        "Source": source,
        "Target": target,
        "ReadOnly": "ro" in options,
    }


def secret_references(settings: SchedulerSettings, ids: Mapping[str, str]) -> list[dict[str, Any]]:
    """``ContainerSpec.Secrets`` for ``swarm_secrets``; ``ids``: secret id by name."""
    references = []
    for entry in settings.swarm_secrets:
        name, _, file = entry.partition(":")
        references.append(
            {
                "SecretID": ids[name],
                "SecretName": name,
                # Readable by the worker's non-root user; only inside its container.
                "File": {"Name": file or name, "UID": "0", "GID": "0", "Mode": 0o444},
            }
        )
    return references


def task_template(
    settings: SchedulerSettings,
    model: Document,
    environ: Mapping[str, str],
    secret_ids: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The service's ``TaskTemplate`` for ``model`` (Engine API ``TaskSpec``)."""
    function = model.get("function") or {}
    # The operator's SDSWARM_* settings (those meant for workers) reach them, as locally.
    env = {k: v for k, v in environ.items() if k.startswith(PREFIX) and k not in _SCHEDULER_ONLY}
    env |= worker_settings(settings, model)
    # A secret read from a file goes on as the file's name (SDSWARM_X_FILE, kept above),
    # not as its value.
    for key in [k for k in env if k + FILE_SUFFIX in env]:
        del env[key]
    # Swarm expands the template per task: the worker's id names its task (hung workers).
    env[f"{PREFIX}WORKER_ID"] = "{{.Task.Name}}"
    env[f"{PREFIX}HUNG_AFTER_S"] = str(settings.hung_after_s)  # for the healthcheck
    limits: dict[str, int] = {}
    if function.get("cpu"):
        limits["NanoCPUs"] = int(float(function["cpu"]) * 1e9)
    if function.get("memorySize"):
        limits["MemoryBytes"] = int(function["memorySize"]) * 2**20  # the seed's MB
    reservations: dict[str, Any] = {}
    if settings.swarm_gpus:
        reservations["GenericResources"] = [
            {
                "DiscreteResourceSpec": {
                    "Kind": settings.swarm_gpu_kind,
                    "Value": settings.swarm_gpus,
                }
            }
        ]
    container: dict[str, Any] = {
        "Image": function.get("image") or settings.worker_image,
        "Env": [f"{k}={v}" for k, v in sorted(env.items())],
        "Labels": {KEY_LABEL: model["model_key"]},
        "Mounts": [_mount(m) for m in settings.swarm_mounts],
        "StopGracePeriod": STOP_GRACE_NS,
    }
    if settings.swarm_secrets:
        container["Secrets"] = secret_references(settings, secret_ids or {})
    if settings.swarm_healthcheck and settings.hung_after_s:
        container["HealthCheck"] = {
            "Test": ["CMD", *settings.swarm_healthcheck],
            "Interval": HEALTH_INTERVAL_NS,
            "Timeout": HEALTH_INTERVAL_NS // 2,
            "Retries": 1,
        }
    return {
        "ContainerSpec": container,
        "Resources": {"Limits": limits, "Reservations": reservations},
        "RestartPolicy": {"Condition": "any", "Delay": 10**9},
        "Placement": {"Constraints": list(settings.swarm_constraints)},
        "Networks": [{"Target": n} for n in settings.swarm_networks],
    }


def spec_hash(template: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:16]


class SwarmBackend:
    def __init__(
        self, settings: SchedulerSettings, environ: Mapping[str, str] | None = None
    ) -> None:
        self.settings = settings
        self.environ = dict(os.environ if environ is None else environ)
        url = settings.docker_url
        connector: aiohttp.BaseConnector
        if url.startswith("unix://"):
            connector = aiohttp.UnixConnector(path=url.removeprefix("unix://"))
            self._base = "http://docker"
        else:
            connector = aiohttp.TCPConnector()
            self._base = url.rstrip("/")
        self._http = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=30)
        )
        self._services: dict[str, dict[str, Any]] = {}
        """Our services by model key, as of the last reconcile (or our own writes)."""
        self._secret_ids: dict[str, str] = {}

    async def _call(
        self, method: str, path: str, body: Any = None, params: Mapping[str, str] | None = None
    ) -> Any:
        url = f"{self._base}/v{self.settings.docker_api_version}{path}"
        async with self._http.request(method, url, json=body, params=params) as response:
            text = await response.text()
            if response.status >= 300:
                try:
                    message = json.loads(text).get("message", text)
                except (ValueError, AttributeError):
                    message = text
                raise DockerError(response.status, message)
            return json.loads(text) if text.strip() else None

    def replicas(self) -> dict[str, int]:
        return {
            key: int(service["Spec"]["Mode"]["Replicated"]["Replicas"])
            for key, service in self._services.items()
        }

    async def reconcile(self) -> None:
        """Our services, found by label (the truth is Swarm's, not this process's)."""
        filters = json.dumps({"label": [KEY_LABEL]})
        listed = await self._call("GET", "/services", params={"filters": filters})
        self._services = {
            s["Spec"]["Labels"][KEY_LABEL]: s
            for s in listed
            if "Replicated" in s["Spec"].get("Mode", {})
        }

    async def _secrets(self) -> dict[str, str]:
        """Ids of the ``swarm_secrets`` (a missing one is an error naming it)."""
        wanted = [entry.partition(":")[0] for entry in self.settings.swarm_secrets]
        if any(name not in self._secret_ids for name in wanted):
            filters = json.dumps({"name": wanted})
            listed = await self._call("GET", "/secrets", params={"filters": filters})
            # The name filter matches prefixes: keep exact names only.
            self._secret_ids = {s["Spec"]["Name"]: s["ID"] for s in listed}
            missing = [name for name in wanted if name not in self._secret_ids]
            if missing:
                raise DockerError(404, f"secrets not found: {', '.join(missing)} (swarm_secrets)")
        return self._secret_ids

    async def ensure(self, model: Document, replicas: int) -> None:
        key = model["model_key"]
        service = self._services.get(key)
        if model.get("status") == ModelStatus.DELETED.value and replicas == 0:
            if service is not None:
                await self._call("DELETE", f"/services/{quote(service['ID'])}")
                del self._services[key]
                log.info("%s: removed service %s", key, service["Spec"]["Name"])
            return
        if service is None and replicas == 0:
            return
        secret_ids = await self._secrets() if self.settings.swarm_secrets else {}
        template = task_template(self.settings, model, self.environ, secret_ids)
        digest = spec_hash(template)
        labels = {KEY_LABEL: key, SPEC_LABEL: digest}
        if self.settings.swarm_stack:
            labels[STACK_LABEL] = self.settings.swarm_stack
        if service is None:
            spec: dict[str, Any] = {
                "Name": names.consumer_name(key),
                "Labels": labels,
                "TaskTemplate": template,
                "Mode": {"Replicated": {"Replicas": replicas}},
            }
            created = await self._call("POST", "/services/create", spec)
            self._services[key] = {"ID": created["ID"], "Version": {"Index": 0}, "Spec": spec}
            log.info("%s: created service %s with %d workers", key, spec["Name"], replicas)
            return
        spec = dict(service["Spec"])
        current = int(spec["Mode"]["Replicated"]["Replicas"])
        if current == replicas and spec.get("Labels", {}).get(SPEC_LABEL) == digest:
            return
        if spec.get("Labels", {}).get(SPEC_LABEL) != digest:
            spec["TaskTemplate"] = template  # rolled out by Swarm, task by task
        spec["Labels"] = {**spec.get("Labels", {}), **labels}
        spec["Mode"] = {"Replicated": {"Replicas": replicas}}
        version = str(service["Version"]["Index"])
        await self._call(
            "POST", f"/services/{quote(service['ID'])}/update", spec, {"version": version}
        )
        # Swarm bumps the version; the next reconcile reads it (an update at a stale
        # version is refused, never applied over someone else's change).
        self._services[key] = {**service, "Spec": spec}
        log.info("%s: service %s → %d workers", key, spec["Name"], replicas)

    async def replace(self, worker: WorkerStatus) -> bool:
        """Kill a hung worker's container; Swarm starts a new task in its place.

        The worker id is its task's name (``sd_<key>.<slot>.<task id>``). The Engine API
        reaches containers only on the node it runs on: False when the task's container
        is elsewhere (its task is still redelivered once in-progress acks stop).
        """
        task_id = worker.worker.rsplit(".", 1)[-1]
        try:
            task = await self._call("GET", f"/tasks/{quote(task_id)}")
            container = task["Status"]["ContainerStatus"]["ContainerID"]
            await self._call("POST", f"/containers/{quote(container)}/kill")
        except (DockerError, KeyError, TypeError) as exc:
            log.warning("cannot replace hung worker %s: %s", worker.worker, exc)
            return False
        return True

    async def step_down(self) -> None:
        """Nothing: the services are Swarm's state, which the next leader reconciles."""

    async def aclose(self) -> None:
        await self._http.close()
