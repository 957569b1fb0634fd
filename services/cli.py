"""The ``sdswarm`` command."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdswarm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the whole system on this machine (foreground)")
    up.add_argument("--data-dir", type=Path, default=Path("data"))
    up.add_argument("--models-dir", type=Path, default=Path("models"))
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=7860)
    up.add_argument(
        "--nats-port",
        type=int,
        default=None,
        help="NATS client port; it must be free (default: 4222, or a free one if taken)",
    )
    up.add_argument("--device", default="auto", help="auto, cpu or cuda (workers)")
    up.add_argument(
        "--gpu-slots",
        type=int,
        default=None,
        help="global budget: tasks running at once over all checkpoints (default 1)",
    )

    up.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="Prometheus /metrics of this process (workers' are listed at /targets);"
        " it must be free; 0: off (default: 9464, or a free one if taken)",
    )

    demo = commands.add_parser("demo-model", help="write a tiny random-weight demo checkpoint")
    demo.add_argument("--models-dir", type=Path, default=Path("models"))

    users = commands.add_parser("users", help="manage users and API keys")
    users.add_argument(
        "--data-dir",
        type=Path,
        default=Path("data"),
        help="where a running `sdswarm up` wrote its endpoints",
    )
    actions = users.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="create a user (password read from stdin)")
    add.add_argument("name")
    remove = actions.add_parser("rm", help="delete a user and all its tokens and keys")
    remove.add_argument("name")
    actions.add_parser("ls", help="list users")
    key = actions.add_parser("key", help="create an API key for a user (printed once)")
    key.add_argument("name")
    key.add_argument("--label", default="")

    from services.modelcli import add_parser as add_models_parser

    add_models_parser(commands)
    status = commands.add_parser("status", help="queues, budget shares and workers")
    status.add_argument("--data-dir", type=Path, default=Path("data"))

    commands.add_parser("gateway", help="run the gateway (settings from SDSWARM_*)")
    commands.add_parser("worker", help="run one inference worker (settings from SDSWARM_*)")
    commands.add_parser(
        "scheduler", help="run the scheduler (one replica leads; settings from SDSWARM_*)"
    )
    commands.add_parser(
        "storage",
        help="run the storage service: event sink, dead letters, reconciler, model scanner",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    from services.common import logs
    from services.common.settings import LogSettings, from_environ

    logs.setup(from_environ(LogSettings))
    match args.command:
        case "up":
            from services.common.servers import PortInUseError
            from services.embedded import DataDirInUseError, UpOptions, up

            options = UpOptions(
                data_dir=args.data_dir,
                models_dir=args.models_dir,
                host=args.host,
                port=args.port,
                nats_port=args.nats_port,
                device=args.device,
                gpu_slots=args.gpu_slots,
                metrics_port=args.metrics_port,
            )
            try:
                asyncio.run(up(options))
            except (PortInUseError, DataDirInUseError) as exc:
                raise SystemExit(f"sdswarm up: {exc}") from None
        case "demo-model":
            from services.inference.tiny import write_demo_checkpoint

            print(write_demo_checkpoint(args.models_dir))
        case "users":
            from services.usercli import run_users

            raise SystemExit(asyncio.run(run_users(args)))
        case "models":
            from services.modelcli import run_models

            raise SystemExit(asyncio.run(run_models(args)))
        case "status":
            from services.statuscli import run_status

            raise SystemExit(asyncio.run(run_status(args)))
        case "gateway":
            from services.gateway.app import main as gateway_main

            gateway_main()
        case "storage":
            from services.storage.service import main as storage_main

            storage_main()
        case "scheduler":
            from services.scheduler.__main__ import main as scheduler_main

            scheduler_main()
        case "worker":
            from services.inference.__main__ import main as worker_main

            worker_main()


if __name__ == "__main__":
    main()
