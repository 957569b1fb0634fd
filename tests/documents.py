"""Task documents as the gateway stores them, for tests that put a task in place without
the gateway (a task stored but never queued, a store's own tests)."""

from __future__ import annotations

import secrets
from typing import Any

from services.storage.mongo import Document
from services.storage.tasks import new_task_document


def task_document(
    task_id: str | None = None,
    *,
    user: str = "u",
    model_name: str = "m",
    model_key: str = "m-000000",
    total_steps: int = 1,
    **fields: Any,
) -> Document:
    """A ``waiting`` txt2img task's document (a fresh id unless given); ``fields``: the
    other arguments of :func:`new_task_document` (``command`` …)."""
    return new_task_document(
        task_id=task_id or secrets.token_hex(12),
        user=user,
        kind="txt2img",
        model_name=model_name,
        model_key=model_key,
        total_steps=total_steps,
        job_count=1,
        **fields,
    )
