"""A real Prometheus (Debian's ``prometheus`` package) scraping a test system.

Started like the other servers: its own data dir and TSDB, a free loopback port, a
generated configuration (JSON, which is YAML), a short scrape interval.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from services.common.servers import ManagedServer, free_port

INSTALL_HINT = "Prometheus is not installed: make prometheus (apt-get install prometheus)"


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if found is None:
        raise FileNotFoundError(INSTALL_HINT)
    return found


class PrometheusServer(ManagedServer):
    name = "prometheus"

    def __init__(
        self,
        data_dir: Path,
        scrape_configs: list[dict[str, Any]],
        rule_files: Sequence[Path] = (),
        port: int = 0,
    ) -> None:
        super().__init__(data_dir)
        self.scrape_configs = scrape_configs
        self.rule_files = [str(Path(p).resolve()) for p in rule_files]
        self.port = port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def prepare(self) -> None:
        self.port = self.port or free_port()
        config = {
            # Timeout ≤ interval, or Prometheus refuses the configuration.
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "scrape_configs": self.scrape_configs,
            "rule_files": self.rule_files,
        }
        (self.data_dir / "prometheus.yml").write_text(json.dumps(config, indent=1))

    def command(self) -> list[str]:
        return [
            prometheus_binary(),
            f"--config.file={self.data_dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.data_dir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]

    async def ready(self) -> bool:
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{self.url}/-/ready", timeout=aiohttp.ClientTimeout(total=2)) as r,
            ):
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query through the HTTP API: the vector's samples."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{self.url}/api/v1/query", params={"query": promql}) as response,
        ):
            body = await response.json()
        assert "success" == body["status"], body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def rule_groups(self) -> list[dict[str, Any]]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{self.url}/api/v1/rules") as response,
        ):
            body = await response.json()
        groups: list[dict[str, Any]] = body["data"]["groups"]
        return groups

    async def value_when(
        self, promql: str, check: Callable[[float], bool], timeout_s: float = 60
    ) -> float:
        """The query's one value once ``check(value)`` holds (polled: scrapes come every
        second; fails after ``timeout_s`` with the last answer)."""
        deadline = time.monotonic() + timeout_s
        last: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            last = await self.query(promql)
            if len(last) == 1 and check(float(last[0]["value"][1])):
                return float(last[0]["value"][1])
            await asyncio.sleep(0.25)
        raise AssertionError(f"{promql}: condition not met in {timeout_s} s; last answer {last}")
