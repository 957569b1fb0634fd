"""Settings: one msgspec Struct per service, built once from an injectable environ.

Business code never reads ``os.environ``; tests build settings from a dict.
Every field ``foo`` is read from ``SDSWARM_FOO``; values are converted by msgspec with
``strict=False`` so ``"30"`` becomes ``30`` and ``"true"`` becomes ``True``; lists are
comma-separated.
A secret may instead come from a file, as Docker secrets are mounted: ``SDSWARM_FOO_FILE``
names a file whose content (without the trailing newline) is the value of ``foo``; a
variable set both ways is refused rather than guessed at.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

PREFIX = "SDSWARM_"
FILE_SUFFIX = "_FILE"
T = TypeVar("T", bound=msgspec.Struct)


def _is_list(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is list:
        return True
    return any(typing.get_origin(arg) is list for arg in typing.get_args(annotation))


def _list_value(raw: str) -> Any:
    """A list setting: comma-separated (``a,b``) or a JSON array (``[1, 5]``)."""
    if raw.lstrip().startswith("["):
        try:
            return msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise SystemExit(f"invalid setting: {raw!r} is not a JSON array") from exc
    return [p.strip() for p in raw.split(",") if p.strip()]


def _raw_value(env: Mapping[str, str], variable: str) -> str | None:
    """``variable``'s value, or the content of the file ``variable_FILE`` names."""
    path = env.get(variable + FILE_SUFFIX)
    if path is None:
        return env.get(variable)
    if variable in env:
        raise SystemExit(f"invalid setting: both {variable} and {variable}{FILE_SUFFIX} are set")
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().removesuffix("\n").removesuffix("\r")
    except OSError as exc:
        raise SystemExit(
            f"invalid setting: {variable}{FILE_SUFFIX}={path!r} cannot be read ({exc.strerror})"
        ) from exc


def from_environ(cls: type[T], environ: Mapping[str, str] | None = None, **overrides: Any) -> T:
    """Build ``cls`` from ``SDSWARM_*`` variables; keyword overrides win (CLI flags)."""
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls, include_extras=True)
    values: dict[str, Any] = {}
    for name in cls.__struct_fields__:
        raw = _raw_value(env, PREFIX + name.upper())
        if raw is None:
            continue
        values[name] = _list_value(raw) if _is_list(hints[name]) else raw
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return msgspec.convert(values, cls, strict=False)
    except msgspec.ValidationError as exc:
        raise SystemExit(f"invalid setting: {exc} (environment prefix {PREFIX})") from exc


class LogSettings(msgspec.Struct, kw_only=True, frozen=True):
    """How every process logs (services/common/logs.py)."""

    log_level: str = "INFO"
    """DEBUG, INFO, WARNING, ERROR."""
    log_format: str = "auto"
    """``json`` (one object a line), ``text`` (for people), or ``auto``: text on a
    terminal, else JSON."""


class BusSettings(LogSettings, kw_only=True, frozen=True):
    """What every service needs to reach NATS."""

    nats_url: str = "nats://127.0.0.1:4222"
    """May carry ``user:password@`` or a token; ``tls://`` for TLS."""
    nats_creds_file: str = ""
    """A NATS ``.creds`` file (decentralised JWT auth)."""
    nats_tls_ca: str = ""
    """CA bundle that signed the NATS server's certificate."""
    nats_tls_cert: str = ""
    nats_tls_key: str = ""
    """Client certificate and key, for servers that verify clients."""
    task_stream_max_msgs: int = 10_000
    """Queue bound: a full stream answers 429 instead of growing without limit."""
    event_max_age_s: float = 24 * 3600
    """How long task events stay replayable for SSE clients."""
    dedupe_window_s: float = 600
    """JetStream de-duplication window for task ids (``Nats-Msg-Id``)."""
    ack_wait_s: float = 60
    """No ack or in-progress ack for this long means the worker is gone: redeliver."""
    max_deliver: int = 3
    metrics_port: int = 0
    """Prometheus ``/metrics`` listener (no auth: bind it where only Prometheus reaches it).
    0: off; -1: a free port chosen at start (logged; workers report it in their liveness
    record, and the scheduler's ``/targets`` lists it for Prometheus' ``http_sd_configs``)."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics listener binds (``0.0.0.0`` in containers)."""
    stream_replicas: int = 1
    """JetStream replicas of every stream and KV bucket the services create: 3 on a
    3-node cluster (deploy/stack.yml), so one node down loses nothing; 1 on one server."""


class StoreSettings(BusSettings, kw_only=True, frozen=True):
    """What a service needs to reach MongoDB and the object store."""

    mongodb_url: str = "mongodb://127.0.0.1:27017"
    mongodb_db: str = "sdswarm"
    store_dir: str = "./data/objects"
    """Local-folder object store root, used when ``s3_endpoint_url`` is empty."""
    s3_endpoint_url: str = ""
    s3_bucket: str = "sdswarm"
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_region: str = "us-east-1"
    s3_public_url: str = ""
    """Where clients reach the S3 endpoint when that is not ``s3_endpoint_url`` (a stack
    that talks to ``http://s3:8333`` inside, published as ``https://s3.example.com``):
    result URLs are signed for it (SigV4 signs the host). Empty: ``s3_endpoint_url``."""
    public_url: str = "http://127.0.0.1:7860"
    """Base URL clients reach the gateway at; local-store download links point there."""
    url_secret: str = ""
    """HMAC key signing local-store download links; random per process when empty."""
    presign_ttl_s: int = 3600
    """Lifetime of result URLs in seconds (the seed's were ~125 days by a unit bug)."""
    models_dir: str = "./models"
    """The shared models folder in A1111's layout (``Stable-diffusion/``, ``Lora/``, …)."""
    reconcile_interval_s: float = 10.0
    """How often the reconciler looks for tasks whose message never landed or was lost."""
    reconcile_grace_s: float = 30.0
    """A task younger than this is left alone (its publish may still be in flight)."""
    lost_after_s: float = 600.0
    """An open task whose message is gone is failed as lost once it is this old."""
    reconcile_max_errors: int = 3
    """Passing errors (timeouts, a full stream) in a row that end a reconciler pass early;
    each such task is retried on the next pass, and one task's error never stops the pass."""
    webhook_allow_hosts: list[str] = msgspec.field(default_factory=list)
    """Hosts task webhooks may call (``hooks.example.com``, ``*.example.com``); empty: off."""
    webhook_allow_http: bool = False
    """Allow plain-http callback URLs (https only otherwise)."""
    webhook_allow_private: bool = False
    """Allow callbacks to loopback, private and link-local addresses (tests, one host)."""
    webhook_max_attempts: int = 6
    webhook_backoff_s: list[float] = msgspec.field(default_factory=lambda: [1, 5, 30, 120, 600])
    """Delay before retry n (the last one repeats)."""
    webhook_timeout_s: float = 10.0
    """A delivery that has not been answered in this long has failed (and is retried)."""
    webhook_connect_timeout_s: float = 5.0
    """Connecting to a receiver may take at most this long (within ``webhook_timeout_s``)."""
    webhook_max_concurrency: int = 64
    """Deliveries in progress at once, over all receivers."""
    webhook_max_per_receiver: int = 4
    """Deliveries in progress at once to one receiver (a user's scheme, host and port)."""
    webhook_max_queued_per_receiver: int = 100
    """Events held waiting for one receiver; more are handed back to the stream for later."""
    webhook_max_in_flight: int = 1000
    """Events the dispatcher holds at once (the consumer's ``max_ack_pending``)."""
    model_scan_interval_s: float = 60.0
    """Rescan ``models_dir`` this often for dropped-in and removed files; 0: only at start."""
    allow_pickle: bool = False
    """Accept and load pickled model files (``.ckpt``, ``.pt``, ``.pth``), weights-only.
    Off: a pickle can execute code, so only ``.safetensors`` files are used."""
