"""The services reach a NATS server that wants TLS and credentials (deployed stacks)."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
from pathlib import Path

import nats
import nats.errors
import pytest

from proto import names
from services.common import bus
from services.common.servers import NatsServer
from services.common.settings import BusSettings

pytestmark = pytest.mark.integration


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl, seconds)."""
    ca_key, ca, key, csr, cert = (
        folder / n for n in ("ca.key", "ca.pem", "s.key", "s.csr", "s.pem")
    )
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
        "-days",
        "1",
        "-subj",
        "/CN=sdswarm test CA",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        "/CN=127.0.0.1",
    )
    run(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        "1",
        "-extfile",
        str(ext),
    )
    return ca, cert, key


async def test_tls_and_password(tmp_path: Path) -> None:
    ca, cert, key = await asyncio.to_thread(_certificates, tmp_path)
    config = (
        f"tls {{\n  cert_file: {json.dumps(str(cert))}\n  key_file: {json.dumps(str(key))}\n}}\n"
        'authorization {\n  user: "sdswarm"\n  password: "s3cret-pass"\n}\n'
    )
    async with NatsServer(tmp_path / "nats", extra_config=config) as server:
        url = f"tls://sdswarm:s3cret-pass@127.0.0.1:{server.port}"
        settings = BusSettings(nats_url=url, nats_tls_ca=str(ca))
        nc = await bus.connect(url, "tls-test", settings)
        try:
            js = nc.jetstream()
            await bus.ensure_streams(js, settings)
            assert names.TASK_STREAM == (await js.stream_info(names.TASK_STREAM)).config.name
        finally:
            await nc.close()

        # Without the CA the server's certificate is not trusted; without the password, no entry.
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.wait_for(_connect_once(url, BusSettings(nats_url=url)), 10)
        wrong = f"tls://sdswarm:wrong@127.0.0.1:{server.port}"
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await asyncio.wait_for(_connect_once(wrong, settings), 10)


async def _connect_once(url: str, settings: BusSettings) -> None:
    context = ssl.create_default_context(cafile=settings.nats_tls_ca or None)
    nc = await nats.connect(
        url, tls=context, max_reconnect_attempts=0, allow_reconnect=False, connect_timeout=3
    )
    await nc.close()
