"""Cold-start phases: laps from the process's own start, shown by ``sdswarm status``."""

from __future__ import annotations

import subprocess
import sys
import time

from services.inference import coldstart
from services.inference.coldstart import Phases, process_started_at
from services.statuscli import cold_start_text


def test_the_process_start_is_read_from_the_kernel_and_counts_imports() -> None:
    # This module was imported well after the interpreter started (pytest's own imports).
    assert process_started_at() < coldstart._IMPORTED_AT
    assert process_started_at() > time.time() - 24 * 3600
    # A process that sleeps before anything else: its start is before the sleep.
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import time; time.sleep(1.0);"
            "from services.inference.coldstart import process_started_at as p;"
            "print(time.time() - p())",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert 1.0 <= float(child.stdout) < 30.0


def test_phases_are_consecutive_laps_that_add_up() -> None:
    started = time.time() - 2.0
    phases = Phases(started)
    phases.lap("imports")
    phases.lap("device")
    phases.lap("device")  # a phase met twice adds up
    seconds = phases.seconds()
    assert ["imports", "device"] == list(seconds)
    assert 2.0 <= seconds["imports"] < 3.0
    assert abs(phases.total() - (time.time() - started)) < 0.1


def test_status_shows_the_cold_start_and_its_phases() -> None:
    model = {
        "cold_start_s": 5.5,
        "cold_start_phases": {"imports": 2.5, "device": 0.25, "weights": 2.75},
    }
    assert "5.5 s = imports 2.5 + device 0.2 + weights 2.8" == cold_start_text(model)
    assert "3.0 s" == cold_start_text({"cold_start_s": 3})


def test_worker_records_of_older_workers_still_decode() -> None:
    import msgspec

    from proto.codec import encode
    from proto.workers import WorkerState, WorkerStatus, decode_worker_status

    old = b'{"worker":"w","model_key":"k","model_name":"m","state":"ready","load_seconds":3.5}'
    record = decode_worker_status(old)
    assert ({}, None, 3.5) == (record.load_phases, record.weights_cached, record.load_seconds)
    new = WorkerStatus(
        worker="w",
        model_key="k",
        model_name="m",
        state=WorkerState.READY,
        load_phases={"imports": 1.5},
        weights_cached=True,
    )
    assert new == decode_worker_status(encode(new))
    assert b"load_phases" not in encode(msgspec.structs.replace(new, load_phases={}))
