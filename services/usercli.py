"""``sdswarm users …``: manage users and API keys in MongoDB.

The MongoDB URL comes from ``SDSWARM_MONGODB_URL``, else from the endpoints file a
running ``sdswarm up`` writes into its data folder.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path

from services.common.settings import from_environ
from services.gateway.settings import GatewaySettings
from services.storage.mongo import database, open_client
from services.storage.users import UserError, UserStore

ENDPOINTS_FILE = "endpoints.json"


def mongodb_url(data_dir: Path) -> tuple[str, str]:
    settings = from_environ(GatewaySettings)
    endpoints = data_dir / ENDPOINTS_FILE
    import os

    if "SDSWARM_MONGODB_URL" not in os.environ and endpoints.is_file():
        saved = json.loads(endpoints.read_text())
        return saved["mongodb_url"], saved.get("mongodb_db", settings.mongodb_db)
    return settings.mongodb_url, settings.mongodb_db


def _read_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if first != getpass.getpass("again: "):
            raise UserError("the passwords differ")
        return first
    return sys.stdin.readline().rstrip("\n")


async def run_users(args: argparse.Namespace) -> int:
    url, db_name = mongodb_url(args.data_dir)
    client = open_client(url)
    store = UserStore(database(client, db_name))
    try:
        match args.action:
            case "add":
                await store.add(args.name, _read_password())
                print(f"user {args.name} created")
            case "rm":
                if not await store.remove(args.name):
                    raise UserError(f"no user {args.name!r}")
                print(f"user {args.name} removed")
            case "ls":
                for name in await store.names():
                    print(name)
            case "key":
                print(await store.create_api_key(args.name, args.label))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        await client.close()
    return 0
