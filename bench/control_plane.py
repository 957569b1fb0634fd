"""What each task costs the control plane: MongoDB commands per task (by command and
collection, from PyMongo's command monitoring) and each process's CPU per task, for the
whole system at a queue depth, with the tiny model on the CPU.

    .venv/bin/python bench/control_plane.py [--tasks 128] [--depth 8] [--steps 4] [--sites]

The gateway, scheduler and storage service run in this process (``sdswarm up``'s
embedded system), so every command they send is counted; workers, nats-server and the
MongoDB-wire server are child processes, read from ``/proc`` (Linux). Compare two
commits back to back (these machines are noisy); the command counts do not depend on
the noise, the CPU figures and the rate do.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import aiohttp
from pymongo import monitoring

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.system import started_system
from services.inference.tiny import build_tiny_sd1

NAME = "bench.safetensors"
TICK_S = 1 / os.sysconf("SC_CLK_TCK")


class Commands(monitoring.CommandListener):
    """Counts the commands this process sends, by (command, collection); with
    ``sites``, also by where in sdswarm's code they were sent from."""

    def __init__(self, sites: bool = False) -> None:
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.sites: collections.Counter[tuple[str, str, str]] | None = (
            collections.Counter() if sites else None
        )

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        target = event.command.get(event.command_name)
        key = (event.command_name, target if isinstance(target, str) else "")
        self.counts[key] += 1
        if self.sites is not None:
            self.sites[(*key, _call_site())] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def _call_site(depth: int = 3) -> str:
    """The innermost frames of sdswarm's own code on the stack, innermost first (the
    monitoring callback runs in the task that sends the command)."""
    ours = [f for f in traceback.extract_stack() if f"{os.sep}services{os.sep}" in f.filename]
    return " < ".join(
        f"{f.filename.rpartition(os.sep + 'services' + os.sep)[2]}:{f.name}"
        for f in reversed(ours[-depth:])
    )


def _stat(pid: int) -> tuple[int, float] | None:
    """A process's parent and its CPU seconds so far (user + system)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (name) "
    return int(fields[1]), (int(fields[11]) + int(fields[12])) * TICK_S


def _name(pid: int) -> str:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(w.decode(errors="replace") for w in words[:3] if w)
    for known in ("nats-server", "secantus", "zygote", "services.inference"):
        if known in text:
            return "worker" if known in ("zygote", "services.inference") else known
    return Path(words[0].decode(errors="replace")).name


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """This process and its descendants: name and CPU seconds so far."""
    parents: dict[int, int] = {}
    seconds: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parents[int(entry.name)], seconds[int(entry.name)] = stat
    family, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in family:
                family.add(pid)
                frontier.append(pid)
    here = "gateway, scheduler, storage"
    return {pid: (here if pid == os.getpid() else _name(pid), seconds[pid]) for pid in family}


async def measure(args: argparse.Namespace, commands: Commands) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        models = root / "models"
        target = models / "Stable-diffusion" / NAME
        target.parent.mkdir(parents=True)
        build_tiny_sd1(root / "tiny").single_file.rename(target)
        body: dict[str, Any] = {
            "stable_diffusion_model": NAME,
            "steps": args.steps,
            "width": args.size,
            "height": args.size,
            "sampler_name": "Euler",
        }
        limits = {"max_open_tasks_per_user": 100_000, "max_tasks_per_minute": 100_000}
        async with (
            started_system(
                root,
                models,
                gateway=limits | {"sync_timeout_s": 3600},
                scheduler={"gpu_slots": args.slots, "max_batch": args.batch},
            ) as system,
            aiohttp.ClientSession() as http,
        ):

            async def one(n: int) -> None:
                async with http.post(
                    f"{system.url}/txt2img", json=body | {"seed": n, "prompt": f"a cat {n}"}
                ) as response:
                    answer = await response.json()
                    assert answer.get("status") == "succeeded", answer

            await one(0)  # the worker is up and warm
            await asyncio.sleep(1)
            commands.counts.clear()
            before = cpu_by_process()
            started = time.perf_counter()
            per_client = max(args.tasks // args.depth, 1)

            async def client(c: int) -> None:
                for i in range(per_client):
                    await one(1 + c * per_client + i)

            await asyncio.gather(*(client(c) for c in range(args.depth)))
            seconds = time.perf_counter() - started
            after = cpu_by_process()
    tasks = per_client * args.depth
    print(
        f"{tasks} tasks at depth {args.depth} ({args.steps} steps, {args.size}², batch"
        f" {args.batch}) in {seconds:.2f} s: {tasks / seconds:.1f} tasks/s"
    )
    cpu: collections.defaultdict[str, float] = collections.defaultdict(float)
    for pid, (name, total) in after.items():
        cpu[name] += total - before.get(pid, (name, 0.0))[1]
    for name, total in sorted(cpu.items(), key=lambda item: -item[1]):
        print(f"  CPU {name:28} {total / tasks * 1000:7.1f} ms per task")
    print(f"MongoDB commands per task: {commands.counts.total() / tasks:.2f}")
    for (command, collection), count in commands.counts.most_common():
        print(f"  {count / tasks:6.2f}  {command} {collection}")
    if commands.sites is not None:
        print("by call site (innermost first):")
        for (command, collection, site), count in commands.sites.most_common(20):
            print(f"  {count / tasks:6.2f}  {command} {collection}: {site}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=128)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--slots", type=int, default=1, help="workers (sdswarm up --gpu-slots)")
    parser.add_argument("--sites", action="store_true", help="count by call site too")
    args = parser.parse_args()
    commands = Commands(sites=args.sites)
    monitoring.register(commands)  # before any client exists: every client reports here
    asyncio.run(measure(args, commands))


if __name__ == "__main__":
    main()
