"""The one log format: JSON lines with the context fields where they apply."""

from __future__ import annotations

import io
import json
import logging
import sys
from typing import Any

import pytest

from services.common import logs
from services.common.settings import LogSettings


def _record(
    msg: str = "hello %s", args: tuple[Any, ...] = ("world",), **extra: Any
) -> logging.LogRecord:
    record = logging.LogRecord("sdswarm.test", logging.WARNING, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_json_line_has_level_logger_message_and_utc_time() -> None:
    line = logs.JsonFormatter().format(_record())
    entry = json.loads(line)
    assert "\n" not in line
    assert "WARNING" == entry["level"]
    assert "sdswarm.test" == entry["logger"]
    assert "hello world" == entry["msg"]
    assert entry["ts"].endswith("Z")
    assert not set(logs.FIELDS) & set(entry)  # absent where they do not apply


def test_extra_fields_and_a_traceback_stay_on_one_line() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = _record("line one\nline two", (), task_id="t-1", model_key="tiny-abc")
        record.exc_info = sys.exc_info()
    line = logs.JsonFormatter().format(record)
    entry = json.loads(line)
    assert "\n" not in line
    assert "line one\nline two" == entry["msg"]
    assert "t-1" == entry["task_id"]
    assert "tiny-abc" == entry["model_key"]
    assert "ValueError: bad" in entry["exc"]


async def test_bound_fields_apply_inside_and_are_gone_after() -> None:
    formatter = logs.JsonFormatter()

    async def inner() -> dict[str, Any]:
        # extra= wins over a bound field
        return {
            "bound": json.loads(formatter.format(_record())),
            "extra": json.loads(formatter.format(_record(task_id="mine"))),
        }

    seen = await logs.with_fields(inner(), task_id="a,b", worker="w-1")
    assert "a,b" == seen["bound"]["task_id"]
    assert "w-1" == seen["bound"]["worker"]
    assert "mine" == seen["extra"]["task_id"]
    assert "task_id" not in json.loads(formatter.format(_record()))


def test_process_fields_from_setup_and_level_from_settings() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.setup(LogSettings(log_level="warning", log_format="json"), model_key="k", worker="w")
        assert logging.WARNING == root.level
        entry = json.loads(logs.JsonFormatter().format(_record()))
        assert ("k", "w") == (entry["model_key"], entry["worker"])
    finally:
        logs.setup(LogSettings(log_format="json"))
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_text_format_appends_context_after_the_first_line() -> None:
    record = _record(worker="w-2")
    line = logs.TextFormatter().format(record)
    assert line.endswith("hello world [worker=w-2]")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_text_on_a_terminal_and_json_elsewhere() -> None:
    assert isinstance(logs.formatter("auto", _Tty()), logs.TextFormatter)
    assert isinstance(logs.formatter("auto", io.StringIO()), logs.JsonFormatter)


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        (LogSettings(log_format="xml"), "SDSWARM_LOG_FORMAT"),
        (LogSettings(log_level="chatty"), "SDSWARM_LOG_LEVEL"),
    ],
)
def test_bad_settings_name_the_variable(settings: LogSettings, named: str) -> None:
    with pytest.raises(SystemExit, match=named):
        logs.setup(settings)
