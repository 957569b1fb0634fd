"""The one logging setup of every service: JSON lines, or text for people at a terminal.

Each record is one JSON object: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg``,
then ``task_id``, ``model_key`` and ``worker`` where they apply, and ``exc`` with the
traceback. Those three come, in this order of precedence, from ``extra={...}`` on the
call, from fields bound for the code running now (:func:`with_fields`, a context
variable, so tasks and threads started from there inherit them), or from fields bound
for the whole process (:func:`setup`: a worker's checkpoint and id).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Awaitable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from services.common.settings import LogSettings

FIELDS = ("task_id", "model_key", "worker")
"""Context fields a record carries when they apply (and only then)."""
_bound: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "sdswarm_log_fields", default=MappingProxyType({})
)
_process_fields: dict[str, str] = {}
T = TypeVar("T")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def fields_of(record: logging.LogRecord) -> dict[str, str]:
    """The context fields of ``record``: ``extra=`` over bound over process-wide."""
    bound = _bound.get()
    out: dict[str, str] = {}
    for name in FIELDS:
        value = getattr(record, name, None) or bound.get(name) or _process_fields.get(name)
        if value:
            out[name] = str(value)
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry |= fields_of(record)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The classic line, with the context fields appended as ``[key=value …]``."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = fields_of(record)
        if not context:
            return line
        head, sep, rest = line.partition("\n")  # a traceback follows the first line
        tags = " ".join(f"{k}={v}" for k, v in context.items())
        return f"{head} [{tags}]{sep}{rest}"


def formatter(fmt: str, stream: Any = None) -> logging.Formatter:
    """``json``, ``text``, or ``auto`` (text when ``stream`` is a terminal)."""
    match fmt.lower():
        case "json":
            return JsonFormatter()
        case "text":
            return TextFormatter()
        case "auto":
            isatty = getattr(stream or sys.stderr, "isatty", None)
            return TextFormatter() if isatty is not None and isatty() else JsonFormatter()
    raise SystemExit(f"invalid setting: SDSWARM_LOG_FORMAT={fmt!r} (json, text or auto)")


def setup(settings: LogSettings, **process_fields: str) -> None:
    """Configure the root logger once per process (replacing any earlier setup);
    ``process_fields`` (``model_key``, ``worker``) go on every record of this process."""
    level = logging.getLevelName(settings.log_level.upper())
    if not isinstance(level, int):
        raise SystemExit(
            f"invalid setting: SDSWARM_LOG_LEVEL={settings.log_level!r}"
            " (DEBUG, INFO, WARNING or ERROR)"
        )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(settings.log_format, sys.stderr))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    _process_fields.clear()
    _process_fields.update({k: v for k, v in process_fields.items() if v})


async def with_fields(awaitable: Awaitable[T], **fields: str) -> T:
    """Await ``awaitable`` with ``fields`` on its records (and those of tasks and threads
    it starts); they are unbound when it returns."""
    token = _bound.set({**_bound.get(), **fields})
    try:
        return await awaitable
    finally:
        _bound.reset(token)
