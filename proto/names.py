"""Every name on the bus, built in one place.

Subjects, streams, consumers, KV buckets and headers are derived here and nowhere
else, so a grep for a literal ``"sd.`` outside this module finds nothing and an
operator can predict every name from a model key or a task id.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

# Work-queue stream holding every queued generation command, one subject per checkpoint,
# so that each checkpoint's durable consumer sees only its own backlog.
TASK_STREAM = "SD_TASKS"
TASK_SUBJECT_PREFIX = "sd.task"
TASK_SUBJECTS = f"{TASK_SUBJECT_PREFIX}.>"

# Limits-retention stream of task events; SSE replays from it, the storage sink folds it.
EVENT_STREAM = "SD_EVENTS"
EVENT_SUBJECT_PREFIX = "sd.event"
EVENT_SUBJECTS = f"{EVENT_SUBJECT_PREFIX}.>"

# Core-NATS subject a worker listens on to stop a running task between steps.
CANCEL_SUBJECT_PREFIX = "sd.cancel"
SKIP_PAYLOAD = b"skip"
"""On a cancel subject: A1111's skip (end the current job of a batch), not a cancel."""
# KV bucket holding one key per cancelled task: a queued task is skipped when fetched.
CANCEL_BUCKET = "sd_cancel"
# Core NATS (not stored): the sink has folded a task's terminal event into its document;
# a sync request waiting for the task reads the document then (no polling).
FOLDED_SUBJECT_PREFIX = "sd.folded"
# Core NATS (not stored): the registry or a user's options changed; gateways forget the
# reads they remember (services/storage/readcache.py) at once instead of after their TTL.
REGISTRY_CHANGED_SUBJECT = "sd.registry.changed"
# Core NATS (not stored): every worker steps down, in turn within its pool, after its task.
RESTART_SUBJECT = "sd.control.restart"

# KV bucket of worker liveness records (proto.workers.WorkerStatus), one key per worker.
WORKER_BUCKET = "sd_workers"

# KV bucket of leases (one key per elected role); its max_age is the lease duration.
LEADER_BUCKET = "sd_leader"
# The key the scheduler replicas compete for: its value names the acting replica.
SCHEDULER_LEADER_KEY = "scheduler"

# Durable consumers of the storage service on EVENT_STREAM: the fold, the webhooks.
STORAGE_CONSUMER = "storage"
WEBHOOK_CONSUMER = "webhooks"
CONSUMER_PREFIX = "sd_"

# Stream that keeps JetStream's advisories about SD_TASKS (max deliveries reached, message
# terminated) so that the dead-letter handler sees them even if it was down when they fired.
ADVISORY_STREAM = "SD_ADVISORIES"
DEAD_LETTER_CONSUMER = "dead_letters"
_ADVISORY_PREFIX = "$JS.EVENT.ADVISORY.CONSUMER"
MAX_DELIVERIES_ADVISORY = "MAX_DELIVERIES"
TERMINATED_ADVISORY = "MSG_TERMINATED"

# Header JetStream uses for de-duplication; we set it to the task id.
MSG_ID_HEADER = "Nats-Msg-Id"

# Extras (upscaling) need no checkpoint: they have a worker pool of their own, keyed like
# a checkpoint's, so they queue on ``sd.task.extras`` and consumer ``sd_extras``. The key
# cannot collide with a checkpoint's, which always ends in ``-<6 hex digits>``.
EXTRAS_MODEL_KEY = "extras"

_MODEL_KEY_RE = re.compile(r"^[a-z0-9_]{1,40}-[0-9a-f]{6}$")
_TASK_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def model_key(name: str) -> str:
    """Map a registered model name to a stable, subject-safe, human-readable key.

    The slug makes ``nats consumer ls`` readable; the hash of the full name keeps two
    names that slug alike (``a b.safetensors`` and ``sub/a_b.safetensors``) apart.
    """
    stem = name.rsplit("/", 1)[-1]
    for suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "_", ascii_stem.lower()).strip("_")[:40].strip("_")
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return f"{slug or 'model'}-{digest}"


def is_model_key(value: str) -> bool:
    return bool(_MODEL_KEY_RE.fullmatch(value))


def check_task_id(task_id: str) -> str:
    """Task ids become subject tokens and object-key parts: refuse anything else."""
    if not _TASK_ID_RE.fullmatch(task_id):
        raise ValueError(f"task id {task_id!r} must match {_TASK_ID_RE.pattern}")
    return task_id


def scoped_task_id(user: str, client_id: str) -> str:
    """The internal id of a task whose id the client chose (``taskId``, ``force_task_id``).

    A client-chosen id is the client's name for its own task, not a global one: stored
    as is, another user's id would answer 409 (an oracle) and ids could be squatted. The
    internal id (Mongo ``_id``, ``Nats-Msg-Id``, subjects, object keys) is a hash of the
    owner and the chosen id, shaped like a generated id (24 hex digits); the chosen one is
    kept on the task document and is what the client is shown.
    """
    return hashlib.sha256(f"{user}\n{client_id}".encode()).hexdigest()[:24]


def task_subject(key: str) -> str:
    return f"{TASK_SUBJECT_PREFIX}.{key}"


def consumer_name(key: str) -> str:
    return f"{CONSUMER_PREFIX}{key}"


def event_subject(task_id: str, kind: str) -> str:
    return f"{EVENT_SUBJECT_PREFIX}.{check_task_id(task_id)}.{kind}"


def end_msg_id(task_id: str) -> str:
    """The ``Nats-Msg-Id`` of a worker's terminal event: one per task, whatever its kind
    and attempt, so the event stream keeps only the first end within its dedupe window.
    Two attempts can both run a task to its end: a nats-server killed with ``kill -9``
    may lose a consumer's latest acks and deliveries, and hand out again a message whose
    task is running or has just ended."""
    return f"{check_task_id(task_id)}.end"


def task_events_filter(task_id: str) -> str:
    """All events of one task (replay for SSE)."""
    return f"{EVENT_SUBJECT_PREFIX}.{check_task_id(task_id)}.>"


def folded_subject(task_id: str) -> str:
    return f"{FOLDED_SUBJECT_PREFIX}.{check_task_id(task_id)}"


def cancel_subject(task_id: str) -> str:
    return f"{CANCEL_SUBJECT_PREFIX}.{check_task_id(task_id)}"


def image_key(user: str, task_id: str, n: int) -> str:
    """Object key of the n-th output image (1-based, as in the seed)."""
    return f"images/{user}/{check_task_id(task_id)}_{n}.png"


def input_key(user: str, task_id: str, n: int, extension: str) -> str:
    """Object key of the n-th input image a request carried inline (0-based)."""
    return f"inputs/{user}/{check_task_id(task_id)}_{n}.{extension}"


def owned_prefixes(user: str) -> tuple[str, ...]:
    """The key prefixes of a user's own objects (results and inputs): what a request of
    theirs may name as an input image."""
    return f"images/{user}/", f"inputs/{user}/"


def preview_key(user: str, task_id: str) -> str:
    return f"images/{user}/{check_task_id(task_id)}_progress.png"


def advisory_subject(kind: str, stream: str = TASK_STREAM, consumer: str = "*") -> str:
    """``$JS.EVENT.ADVISORY.CONSUMER.<kind>.<stream>.<consumer>`` (kinds above)."""
    return f"{_ADVISORY_PREFIX}.{kind}.{stream}.{consumer}"


def worker_kv_key(worker_id: str) -> str:
    """KV keys allow letters, digits and ``-/_=.``: anything else becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_=.-]", "_", worker_id)[:128] or "worker"
