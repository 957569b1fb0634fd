"""The Swarm backend against a stand-in of the Docker Engine API.

A fast unit-level test of the client against the documented API shape
(https://docs.docker.com/reference/api/engine/, v1.44; the real engine is driven by
tests/swarm, `make test-swarm`): the stand-in below is an aiohttp app on a unix socket,
as ``/var/run/docker.sock`` is, that serves only the versioned endpoints the backend
uses, keeps services with a ``Version.Index`` and refuses an update at a stale version
like Swarm does ("update out of sequence"). The tests check the exact requests: method,
path with the version prefix, the ``version`` query parameter of updates, and the JSON
bodies.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proto import ModelStatus, ModelType, names
from proto.workers import WorkerState, WorkerStatus
from services.common import bus
from services.common.servers import NatsServer
from services.common.settings import from_environ
from services.scheduler.__main__ import open_backend
from services.scheduler.app import Scheduler
from services.scheduler.settings import SchedulerSettings
from services.scheduler.swarm import DockerError, SwarmBackend
from services.storage.models import ModelStore, model_document
from services.storage.mongo import Document, database, open_client
from services.storage.tasks import TaskStore

pytestmark = pytest.mark.integration
V = "/v1.44"


@dataclass
class Engine:
    """What the stand-in engine holds and what it was asked."""

    services: dict[str, dict[str, Any]] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    """Secret id by name."""
    requests: list[tuple[str, str, dict[str, str], Any]] = field(default_factory=list)
    killed: list[str] = field(default_factory=list)

    def writes(self) -> list[tuple[str, str, dict[str, str], Any]]:
        return [r for r in self.requests if r[0] != "GET"]


def engine_app(engine: Engine) -> web.Application:
    async def record(request: web.Request) -> Any:
        body = await request.json() if request.can_read_body else None
        engine.requests.append((request.method, request.path, dict(request.query), body))
        return body

    async def list_services(request: web.Request) -> web.Response:
        await record(request)
        labels = json.loads(request.query.get("filters", "{}")).get("label", [])
        found = [
            s for s in engine.services.values() if all(k in s["Spec"]["Labels"] for k in labels)
        ]
        return web.json_response(found)

    async def create(request: web.Request) -> web.Response:
        spec = await record(request)
        if any(s["Spec"]["Name"] == spec["Name"] for s in engine.services.values()):
            return web.json_response({"message": "name conflicts"}, status=409)
        sid = secrets.token_hex(12)
        engine.services[sid] = {"ID": sid, "Version": {"Index": 11}, "Spec": spec}
        return web.json_response({"ID": sid, "Warnings": []}, status=201)

    async def update(request: web.Request) -> web.Response:
        spec = await record(request)
        service = engine.services.get(request.match_info["id"])
        if service is None:
            return web.json_response({"message": "service not found"}, status=404)
        if int(request.query["version"]) != service["Version"]["Index"]:
            message = "rpc error: code = Unknown desc = update out of sequence"
            return web.json_response({"message": message}, status=500)
        service["Spec"] = spec
        service["Version"]["Index"] += 1
        return web.json_response({"Warnings": []})

    async def delete(request: web.Request) -> web.Response:
        await record(request)
        engine.services.pop(request.match_info["id"])
        return web.Response(status=200)

    async def task(request: web.Request) -> web.Response:
        await record(request)
        tid = request.match_info["id"]
        return web.json_response(
            {
                "ID": tid,
                "Status": {"State": "running", "ContainerStatus": {"ContainerID": "c" + tid}},
            }
        )

    async def list_secrets(request: web.Request) -> web.Response:
        await record(request)
        prefixes = json.loads(request.query.get("filters", "{}")).get("name", [])
        # Like the engine: the name filter matches prefixes.
        found = [
            {"ID": sid, "Spec": {"Name": name}}
            for name, sid in engine.secrets.items()
            if any(name.startswith(p) for p in prefixes)
        ]
        return web.json_response(found)

    async def kill(request: web.Request) -> web.Response:
        await record(request)
        engine.killed.append(request.match_info["id"])
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get(f"{V}/services", list_services)
    app.router.add_post(f"{V}/services/create", create)
    app.router.add_post(f"{V}/services/{{id}}/update", update)
    app.router.add_delete(f"{V}/services/{{id}}", delete)
    app.router.add_get(f"{V}/tasks/{{id}}", task)
    app.router.add_post(f"{V}/containers/{{id}}/kill", kill)
    app.router.add_get(f"{V}/secrets", list_secrets)
    return app


@pytest.fixture
async def engine() -> AsyncIterator[tuple[Engine, str]]:
    state = Engine()
    runner = web.AppRunner(engine_app(state))
    await runner.setup()
    # A short path: unix socket paths are limited to about 100 bytes.
    with tempfile.TemporaryDirectory(prefix="dock", dir="/tmp") as folder:
        socket = str(Path(folder) / "docker.sock")
        await web.UnixSite(runner, socket).start()
        yield state, f"unix://{socket}"
        await runner.cleanup()


def _settings(docker_url: str) -> SchedulerSettings:
    return SchedulerSettings(
        docker_url=docker_url,
        nats_url="nats://nats:4222",
        mongodb_url="mongodb://mongo:27017",
        models_dir="/models",
        cache_dir="/cache",
        worker_image="sdswarm/worker:1.0",
        swarm_networks=["sdswarm_default"],
        swarm_mounts=["sdswarm_models:/models:ro", "/srv/cache:/cache"],
        swarm_constraints=["node.labels.gpu==true"],
    )


def _model(**extra: Any) -> Document:
    document = model_document(
        name="dream shaper.safetensors",
        model_type=ModelType.STABLE_DIFFUSION,
        path="/models/Stable-diffusion/dream shaper.safetensors",
        family="sd1",
        size_bytes=1,
        sha256="ab" * 32,
    )
    return document | extra


ENVIRON = {
    "SDSWARM_PREVIEW_INTERVAL_S": "2",  # meant for workers: passed on
    "SDSWARM_DOCKER_URL": "unix:///var/run/docker.sock",  # the scheduler's own: not
    "SDSWARM_GPU_SLOTS": "8",
    "PATH": "/usr/bin",
}


@pytest.fixture
async def swarm(engine: tuple[Engine, str]) -> AsyncIterator[tuple[Engine, SwarmBackend]]:
    state, url = engine
    backend = SwarmBackend(_settings(url), ENVIRON)
    yield state, backend
    await backend.aclose()


async def test_first_demand_creates_the_service_with_gpu_resources_and_settings(
    swarm: tuple[Engine, SwarmBackend],
) -> None:
    state, backend = swarm
    model = _model(
        function={"image": "me/worker:2", "cpu": 4, "memorySize": 16384, "env": {"A": "1"}}
    )
    await backend.reconcile()
    assert {} == backend.replicas()
    await backend.ensure(model, 0)  # no demand: nothing is created
    await backend.ensure(model, 2)
    key = model["model_key"]
    assert [("GET", f"{V}/services", {"filters": '{"label": ["sdswarm.model_key"]}'}, None)] == [
        r for r in state.requests if r[0] == "GET"
    ]
    [(method, path, query, spec)] = state.writes()
    assert ("POST", f"{V}/services/create", {}) == (method, path, query)
    assert f"sd_{key}" == spec["Name"]
    assert key == spec["Labels"]["sdswarm.model_key"]
    assert {"Replicated": {"Replicas": 2}} == spec["Mode"]
    template = spec["TaskTemplate"]
    assert {
        "Limits": {"NanoCPUs": 4_000_000_000, "MemoryBytes": 16384 * 2**20},
        "Reservations": {
            "GenericResources": [{"DiscreteResourceSpec": {"Kind": "NVIDIA-GPU", "Value": 1}}]
        },
    } == template["Resources"]
    assert {"Constraints": ["node.labels.gpu==true"]} == template["Placement"]
    assert [{"Target": "sdswarm_default"}] == template["Networks"]
    assert {"Condition": "any", "Delay": 10**9} == template["RestartPolicy"]
    container = template["ContainerSpec"]
    assert "me/worker:2" == container["Image"]
    assert {"sdswarm.model_key": key} == container["Labels"]
    assert {
        "Test": ["CMD", "python3.11", "-m", "services.scheduler.healthcheck"],
        "Interval": 30 * 10**9,
        "Timeout": 15 * 10**9,
        "Retries": 1,
    } == container["HealthCheck"]
    assert [
        {"Type": "volume", "Source": "sdswarm_models", "Target": "/models", "ReadOnly": True},
        {"Type": "bind", "Source": "/srv/cache", "Target": "/cache", "ReadOnly": False},
    ] == container["Mounts"]
    env = dict(item.split("=", 1) for item in container["Env"])
    assert {
        "SDSWARM_MODEL_KEY": key,
        "SDSWARM_MODEL_NAME": "dream shaper.safetensors",
        "SDSWARM_CHECKPOINT_PATH": "/models/Stable-diffusion/dream shaper.safetensors",
        "SDSWARM_NATS_URL": "nats://nats:4222",
        "SDSWARM_MONGODB_URL": "mongodb://mongo:27017",
        "SDSWARM_MODELS_DIR": "/models",
        "SDSWARM_CACHE_DIR": "/cache",
        "SDSWARM_PREVIEW_INTERVAL_S": "2",
        "SDSWARM_WORKER_ID": "{{.Task.Name}}",
        "SDSWARM_HUNG_AFTER_S": "600.0",
        "A": "1",
    }.items() <= env.items()
    assert not {"SDSWARM_DOCKER_URL", "SDSWARM_GPU_SLOTS", "SDSWARM_PARENT_PID", "PATH"} & set(env)


async def test_scaling_updates_replicas_at_the_current_version_and_is_idempotent(
    engine: tuple[Engine, str],
) -> None:
    state, url = engine
    model = _model()
    first = SwarmBackend(_settings(url), ENVIRON)
    try:
        await first.ensure(model, 1)
    finally:
        await first.aclose()
    [sid] = state.services
    created = state.services[sid]["Spec"]
    state.requests.clear()
    # A new leader: it finds the service by its label, then scales it.
    backend = SwarmBackend(_settings(url), ENVIRON)
    try:
        await backend.reconcile()
        assert {model["model_key"]: 1} == backend.replicas()
        await backend.ensure(model, 1)  # already so: no request
        assert [] == state.writes()
        await backend.ensure(model, 3)
        await backend.reconcile()
        await backend.ensure(model, 3)
        await backend.ensure(model, 0)  # idle: scale to zero, keep the service
        await backend.reconcile()
        assert {model["model_key"]: 0} == backend.replicas()
    finally:
        await backend.aclose()
    expected_three = created | {"Mode": {"Replicated": {"Replicas": 3}}}
    expected_zero = created | {"Mode": {"Replicated": {"Replicas": 0}}}
    assert [
        ("POST", f"{V}/services/{sid}/update", {"version": "11"}, expected_three),
        ("POST", f"{V}/services/{sid}/update", {"version": "12"}, expected_zero),
    ] == state.writes()
    assert sid in state.services


async def test_a_stale_version_is_refused_not_applied_and_a_new_function_image_rolls_out(
    swarm: tuple[Engine, SwarmBackend],
) -> None:
    state, backend = swarm
    model = _model()
    await backend.ensure(model, 1)
    await backend.reconcile()
    [sid] = state.services
    state.services[sid]["Version"]["Index"] += 5  # someone else changed it meanwhile
    with pytest.raises(DockerError) as refused:
        await backend.ensure(model, 2)
    assert 500 == refused.value.status
    assert 1 == state.services[sid]["Spec"]["Mode"]["Replicated"]["Replicas"]
    await backend.reconcile()  # the next tick reads the new version
    await backend.ensure(model, 2)
    assert 2 == state.services[sid]["Spec"]["Mode"]["Replicated"]["Replicas"]
    old_label = state.services[sid]["Spec"]["Labels"]["sdswarm.spec"]
    await backend.reconcile()
    await backend.ensure(model | {"function": {"image": "me/worker:3"}}, 2)
    spec = state.services[sid]["Spec"]
    assert "me/worker:3" == spec["TaskTemplate"]["ContainerSpec"]["Image"]
    assert old_label != spec["Labels"]["sdswarm.spec"]
    assert 2 == spec["Mode"]["Replicated"]["Replicas"]


async def test_a_deleted_model_loses_its_service_and_a_hung_worker_its_container(
    swarm: tuple[Engine, SwarmBackend],
) -> None:
    state, backend = swarm
    model = _model()
    await backend.ensure(model, 1)
    [sid] = state.services
    hung = WorkerStatus(
        worker=f"sd_{model['model_key']}.1.tsk42",
        model_key=model["model_key"],
        model_name=model["name"],
        state=WorkerState.BUSY,
        task_id="t",
    )
    assert await backend.replace(hung)
    assert ["ctsk42"] == state.killed
    state.requests.clear()
    await backend.reconcile()
    await backend.ensure(model | {"status": ModelStatus.DELETED.value}, 0)
    assert [("DELETE", f"{V}/services/{sid}", {}, None)] == state.writes()
    assert {} == state.services


async def test_the_scheduler_with_the_swarm_backend_starts_a_service_for_backlog(
    engine: tuple[Engine, str], mongo_server: Any, tmp_path: Path
) -> None:
    """``SDSWARM_SCHEDULER_BACKEND=swarm`` end to end on a real nats-server (its own: the
    tick sets consumer limits) and MongoDB: a queued task gets its checkpoint a service."""
    state, url = engine
    async with NatsServer(tmp_path / "nats") as server, contextlib.AsyncExitStack() as stack:
        settings = from_environ(
            SchedulerSettings,
            {"SDSWARM_SCHEDULER_BACKEND": "swarm", "SDSWARM_DOCKER_URL": url},
            nats_url=server.url,
            mongodb_url=mongo_server.url,
            mongodb_db=f"swarm_{secrets.token_hex(4)}",
        )
        mongo = open_client(settings.mongodb_url)
        stack.push_async_callback(mongo.close)
        db = database(mongo, settings.mongodb_db)
        stack.push_async_callback(mongo.drop_database, settings.mongodb_db)
        models = ModelStore(db)
        model = _model()
        await models.upsert(model)
        nc = await bus.connect(server.url, "swarm-test")
        stack.push_async_callback(nc.close)
        js = nc.jetstream()
        await bus.ensure_streams(js, settings)
        await js.publish(names.task_subject(model["model_key"]), b"{}")
        backend = await open_backend(settings, stack)
        assert isinstance(backend, SwarmBackend)
        scheduler = Scheduler(settings, js, models, backend, TaskStore(db))
        result = await scheduler.tick()
        assert 1 == result.workers[model["model_key"]]
        [service] = state.services.values()
        assert f"sd_{model['model_key']}" == service["Spec"]["Name"]
        assert 1 == service["Spec"]["Mode"]["Replicated"]["Replicas"]
        await scheduler.tick()  # nothing new to do: no second create
        assert 1 == sum(1 for r in state.requests if r[1].endswith("/services/create"))
        # Scaled to zero, then the model is deleted: its service goes too.
        service["Spec"]["Mode"]["Replicated"]["Replicas"] = 0
        await models.mark_deleted(model["name"], ModelType.STABLE_DIFFUSION)
        await scheduler.tick()
        assert {} == state.services
        assert ("DELETE", f"{V}/services/{service['ID']}") == state.writes()[-1][:2]


async def test_settings_read_from_secret_files_reach_workers_as_the_same_secrets(
    engine: tuple[Engine, str], tmp_path: Path
) -> None:
    state, url = engine
    state.secrets = {"sdswarm_s3_secret_key": "sec1", "sdswarm_s3_secret_key_old": "sec0"}
    secret = tmp_path / "s3_secret_key"
    secret.write_text("hunter2\n")
    environ = {**ENVIRON, "SDSWARM_S3_SECRET_KEY_FILE": str(secret)}
    settings = from_environ(
        SchedulerSettings,
        {
            **environ,
            "SDSWARM_SWARM_SECRETS": "sdswarm_s3_secret_key:s3_secret_key",
            "SDSWARM_SWARM_STACK": "sdswarm",
        },
        docker_url=url,
    )
    assert "hunter2" == settings.s3_secret_key
    backend = SwarmBackend(settings, environ)
    try:
        await backend.reconcile()
        await backend.ensure(_model(), 1)
    finally:
        await backend.aclose()
    [(_, _, _, spec)] = state.writes()
    # docker stack rm removes the worker services with the stack.
    assert "sdswarm" == spec["Labels"]["com.docker.stack.namespace"]
    container = spec["TaskTemplate"]["ContainerSpec"]
    assert [
        {
            "SecretID": "sec1",
            "SecretName": "sdswarm_s3_secret_key",
            "File": {"Name": "s3_secret_key", "UID": "0", "GID": "0", "Mode": 0o444},
        }
    ] == container["Secrets"]
    env = dict(e.split("=", 1) for e in container["Env"])
    assert str(secret) == env["SDSWARM_S3_SECRET_KEY_FILE"]
    assert "SDSWARM_S3_SECRET_KEY" not in env
    assert not any("hunter2" in e for e in container["Env"])


async def test_a_missing_swarm_secret_is_an_error_naming_it(engine: tuple[Engine, str]) -> None:
    _, url = engine
    settings = SchedulerSettings(docker_url=url, swarm_secrets=["sdswarm_nats_url:nats_url"])
    backend = SwarmBackend(settings, {})
    try:
        with pytest.raises(DockerError, match="secrets not found: sdswarm_nats_url"):
            await backend.ensure(_model(), 1)
    finally:
        await backend.aclose()
