"""The metrics hooks: what each records (read back from the registry the listener serves)."""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
from pathlib import Path

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from proto.workers import CompileState, CompileStatus, WorkerState, WorkerStatus
from services.common import metrics
from services.scheduler.policy import CheckpointLoad, Plan


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _model() -> str:
    return f"m-{secrets.token_hex(3)}"  # the registry is per process: fresh labels per test


def test_terminal_fold_counts_status_code_wait_and_run_time() -> None:
    model = _model()
    created = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
    before = {
        "model_key": model,
        "created_at": created,
        "started_at": created + dt.timedelta(seconds=3),
    }
    finished = (created + dt.timedelta(seconds=10)).timestamp()
    metrics.task_ended(before, "failed", finished, "out_of_memory")
    assert 1 == _value("sdswarm_tasks_total", model=model, status="failed")
    assert 1 == _value("sdswarm_task_errors_total", model=model, code="out_of_memory")
    assert 3 == _value("sdswarm_task_wait_seconds_sum", model=model)
    assert 7 == _value("sdswarm_task_run_seconds_sum", model=model, status="failed")


def test_a_task_cancelled_while_waiting_has_no_wait_or_run_time() -> None:
    model = _model()
    before = {"model_key": model, "created_at": dt.datetime.now(dt.UTC)}
    metrics.task_ended(before, "cancelled", 0.0)
    assert 1 == _value("sdswarm_tasks_total", model=model, status="cancelled")
    assert 0 == _value("sdswarm_task_wait_seconds_count", model=model)
    assert 0 == _value("sdswarm_task_run_seconds_count", model=model, status="cancelled")


def test_naive_and_aware_times_mix() -> None:
    model = _model()
    created = dt.datetime(2026, 1, 1, 12, 0, 0)  # a MongoDB client without tz_aware
    started = dt.datetime(2026, 1, 1, 12, 0, 2, tzinfo=dt.UTC)
    metrics.task_ended(
        {"model_key": model, "created_at": created, "started_at": started},
        "succeeded",
        started.timestamp() + 1,
    )
    assert 2 == _value("sdswarm_task_wait_seconds_sum", model=model)
    assert 1 == _value("sdswarm_task_run_seconds_sum", model=model, status="succeeded")


def test_a_batch_call_observes_its_size_and_shares_its_device_time() -> None:
    model = _model()
    metrics.worker_state(model, WorkerState.READY, 0, {"imports": 1.5, "weights": 2.0})
    assert 2.0 == _value("sdswarm_worker_cold_start_phase_seconds", model=model, phase="weights")
    metrics.worker_state(model, WorkerState.BUSY, 3, None)
    assert 1 == _value("sdswarm_worker_state", model=model, state="busy")
    assert 0 == _value("sdswarm_worker_state", model=model, state="ready")
    metrics.worker_state(model, WorkerState.READY, 0, None)
    assert 1 == _value("sdswarm_batch_size_count", model=model)
    assert 3 == _value("sdswarm_batch_size_sum", model=model)
    assert 3 == _value("sdswarm_task_gpu_seconds_count", model=model)
    assert 1 == _value("sdswarm_worker_state", model=model, state="ready")


def _status(model: str, worker: str, state: WorkerState, address: str = "") -> WorkerStatus:
    return WorkerStatus(
        worker=worker,
        model_key=model,
        model_name="tiny",
        state=state,
        load_phases={"imports": 1.0, "weights": 0.5},
        metrics_address=address,
    )


def test_a_tick_sets_gauges_afresh_counts_cold_starts_once_and_lists_targets() -> None:
    model, gone = _model(), _model()
    metrics.consumer_seen(gone, 4, 0)
    metrics.scheduled(2, [CheckpointLoad(gone, 1, 0, 0, 0)], Plan({gone: 1}, {gone: 1}), [], {})
    assert 4 == _value("sdswarm_queue_depth", model=gone)

    metrics.consumer_seen(model, 5, 2)
    load = CheckpointLoad(
        model, backlog=2, running=1, share=1, workers=1, oldest_wait_s=9.5, pinned=1
    )
    records = [
        _status(model, "w1", WorkerState.BUSY, "127.0.0.1:9999"),
        _status(model, "w2", WorkerState.LOADING),
    ]
    for _ in range(2):
        metrics.scheduled(2, [load], Plan({model: 2}, {model: 2}), records, {model: 2})
    assert 1 == _value("sdswarm_scheduler_leader")
    assert 2 == _value("sdswarm_budget_slots")
    assert (5, 2) == (
        _value("sdswarm_queue_depth", model=model),
        _value("sdswarm_tasks_in_flight", model=model),
    )
    assert 9.5 == _value("sdswarm_queue_oldest_wait_seconds", model=model)
    assert 2 == _value("sdswarm_budget_share_slots", model=model)
    assert 1 == _value("sdswarm_budget_pinned_slots", model=model)
    assert 2 == _value("sdswarm_worker_replicas", model=model)
    assert (1, 1, 0) == tuple(
        _value("sdswarm_workers", model=model, state=s) for s in ("busy", "loading", "ready")
    )
    assert 1 == _value("sdswarm_cold_starts_total", model=model)  # two ticks, one worker
    assert 1.5 == _value("sdswarm_cold_start_seconds_sum", model=model)
    assert 0.5 == _value("sdswarm_cold_start_phase_seconds_sum", model=model, phase="weights")
    assert REGISTRY.get_sample_value("sdswarm_queue_depth", {"model": gone}) is None
    assert [
        {"targets": ["127.0.0.1:9999"], "labels": {"model": model, "worker": "w1"}}
    ] == metrics.worker_targets()

    metrics.stood_down()
    assert (0, 0) == (_value("sdswarm_scheduler_leader"), _value("sdswarm_budget_slots"))
    assert REGISTRY.get_sample_value("sdswarm_queue_depth", {"model": model}) is None
    assert [] == metrics.worker_targets()


def test_the_exposition_parses_and_names_no_user() -> None:
    metrics.task_submitted(_model())
    families = {f.name for f in text_string_to_metric_families(metrics.generate_latest().decode())}
    assert {"sdswarm_tasks", "sdswarm_sse_clients", "sdswarm_webhook_deliveries"} <= families
    labels = {
        name
        for family in text_string_to_metric_families(metrics.generate_latest().decode())
        for sample in family.samples
        for name in sample.labels
    }
    assert not {"user", "task_id", "host"} & labels


def dashboard_queries() -> list[str]:
    """Every PromQL expression of ``deploy/grafana-dashboard.json``."""
    path = Path(__file__).parents[2] / "deploy" / "grafana-dashboard.json"
    dashboard = json.loads(path.read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


def test_the_dashboard_names_only_metrics_that_exist() -> None:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    exposed = {
        family.name + suffix
        for family in REGISTRY.collect()
        for suffix in suffixes.get(family.type, ("",))
    }
    named = {name for expr in dashboard_queries() for name in re.findall(r"sdswarm_\w+", expr)}
    assert 20 <= len(named)
    assert set() == named - exposed


def test_a_workers_compile_progress_is_exported() -> None:
    model = _model()
    status = CompileStatus(state=CompileState.READY, ready=["2@512x512"], seconds=41.5, calls=60)
    metrics.worker_compile(model, status)
    assert 1 == _value("sdswarm_worker_compile_state", model=model, state="ready")
    assert 0 == _value("sdswarm_worker_compile_state", model=model, state="compiling")
    assert 1 == _value("sdswarm_worker_compiled_shapes", model=model)
    assert 41.5 == _value("sdswarm_worker_compile_seconds", model=model)
    assert 60 == _value("sdswarm_worker_compiled_unet_calls", model=model)
