"""``python -m services.inference.zygote``: the fork server of the local backend.

It imports what every worker imports (:mod:`services.inference.preload`: torch,
diffusers, transformers, sdswarm's inference modules; no CUDA), says ``ready``, then
forks one worker per request. Its protocol is JSON lines: requests on stdin
(``{"env": {...}, "log": "path"}``, optionally ``"script": [file, arg, ...]``), answers
on stdout (``{"ready": true}`` once, ``{"pid": n}`` per request in order,
``{"exit": pid, "code": c}`` when a worker ends; a code below 0 is the signal that
killed it, as subprocess reports). It exits when its
stdin closes (the scheduler is gone); the kernel then kills its workers (parent-death
signal), as it kills an exec'd worker whose scheduler dies.
"""

from __future__ import annotations

import json
import os
import runpy
import selectors
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any, TextIO

from services.common.settings import PREFIX
from services.common.supervise import die_with_parent

WORKER_COMMAND = [sys.executable, "-m", "services.inference"]


def run_worker(
    env: dict[str, str], log_path: str, cuda_present: bool, script: list[str] | None = None
) -> int:
    """In a fresh fork: become the worker ``env`` describes, output appended to
    ``log_path``; its exit code. ``cuda_present``: the server saw a CUDA device.
    ``script``: run this Python file with these arguments instead of the worker (how
    ``bench/cold_start.py`` times a forked start)."""
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(devnull)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own stdin, kept
    os.environ.clear()
    os.environ.update(env)
    os.environ[f"{PREFIX}PARENT_PID"] = str(os.getppid())
    import torch

    # torch marks every fork "bad" for CUDA once the parent has asked the driver anything
    # (an import's is_available() without NVML, as on hosts without a GPU). A worker that
    # may use CUDA then starts a fresh interpreter: it pays the imports, but works.
    poisoned = torch.cuda.is_initialized() or torch.cuda._is_in_bad_fork()  # type: ignore[no-untyped-call]
    command = [sys.executable, *script] if script else WORKER_COMMAND
    if poisoned and cuda_present and env.get(f"{PREFIX}DEVICE", "auto") != "cpu":
        os.execve(sys.executable, command, dict(os.environ))
    from services.inference.__main__ import main

    try:
        if script:
            sys.argv = list(script)
            runpy.run_path(script[0], run_name="__main__")
        else:
            main()
    except SystemExit as exit_:
        code = exit_.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)  # what the interpreter does with a message
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return 0


_protocol: TextIO = sys.stdout
"""Where answers go: the scheduler's pipe (a copy of stdout, see :func:`serve`)."""


def _answer(message: dict[str, Any]) -> None:
    _protocol.write(json.dumps(message) + "\n")
    _protocol.flush()


def _fork(
    request: dict[str, Any],
    wakeup: tuple[int, int],
    preexec: Callable[[], None] | None,
    cuda_present: bool,
) -> int:
    pid = os.fork()
    if pid:
        return pid
    # The child: none of the server's plumbing, the default signal dispositions, and
    # killed when the server goes.
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for fd in (*wakeup, _protocol.fileno()):
            os.close(fd)
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        if preexec is not None:
            preexec()
        code = run_worker(request["env"], request["log"], cuda_present, request.get("script"))
    finally:
        os._exit(code)


def serve() -> None:
    global _protocol
    # Answers go to a copy of stdout; stdout itself becomes stderr, so nothing an import
    # prints can break the protocol.
    _protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    import torch

    import services.inference.preload  # noqa: F401 - the point of this process

    cuda_present = torch.cuda.is_available()

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the scheduler stops us (stdin closes)
    read_wakeup, write_wakeup = os.pipe()
    os.set_blocking(write_wakeup, False)
    signal.set_wakeup_fd(write_wakeup)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the selector via the pipe
    preexec = die_with_parent(signal.SIGKILL)  # made here: it names this process
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin, selectors.EVENT_READ)
    selector.register(read_wakeup, selectors.EVENT_READ)
    _answer({"ready": True})
    while True:
        for key, _ in selector.select():
            if key.fd != read_wakeup:
                line = sys.stdin.readline()
                if not line:
                    return  # the scheduler is gone
                request = json.loads(line)
                wakeup = (read_wakeup, write_wakeup)
                _answer({"pid": _fork(request, wakeup, preexec, cuda_present)})
            else:
                os.read(read_wakeup, 512)
        _reap()


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _answer({"exit": pid, "code": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    serve()
