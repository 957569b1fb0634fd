"""Gateway settings (``SDSWARM_*``); every client-facing limit is here and configurable."""

from __future__ import annotations

import msgspec

from services.common.settings import StoreSettings


class GatewaySettings(StoreSettings, kw_only=True, frozen=True):
    host: str = "127.0.0.1"
    port: int = 7860
    """7860 is where AUTOMATIC1111 clients look by default."""
    api_keys: list[str] = msgspec.field(default_factory=list)
    """Static ``user:key`` pairs, in addition to keys made with ``sdswarm users key``."""
    admins: list[str] = msgspec.field(default_factory=list)
    """Users who may manage functions (with authentication off, everyone may)."""
    auth: bool = False
    """Require credentials even on loopback (always required beyond it)."""
    session_ttl_s: float = 24 * 3600
    """Lifetime of a ``POST /login`` token."""
    login_max_failures_per_user: int = 10
    """Login attempts per user name in one ``login_window_s`` (a success clears them);
    beyond it → 429 with ``Retry-After`` until the window ends, right password or not
    (0: no limit)."""
    login_max_attempts_per_address: int = 30
    """Login attempts from one client address in one ``login_window_s`` (0: no limit)."""
    login_window_s: float = 300
    password_checks: int = 1
    """Argon2 checks run at once, each in a worker thread (one takes ~60 MiB and several
    cores for tens of ms); more logins wait their turn, other routes do not wait."""
    sync_timeout_s: float = 600
    """A sync request still unfinished after this answers 202 with its task id."""
    registry_cache_s: float = 5.0
    """How long this gateway remembers the registry and options reads each submission
    makes (~3 MongoDB reads per task). Every write, in any process (another replica, the
    storage service registering a file it found, the scheduler's model status), is
    announced on ``sd.registry.changed`` and forgets them at once, as does a reconnect to
    NATS (notices sent meanwhile are lost); this bounds how long a notice lost otherwise
    leaves a read stale. 0: every read goes to MongoDB."""

    # Limits: bad input is refused at the edge and costs nothing.
    max_body_bytes: int = 32 * 1024 * 1024
    max_width: int = 2048
    max_height: int = 2048
    max_pixels: int = 2048 * 2048
    """Per image, ``width × height``."""
    max_steps: int = 150
    max_batch_size: int = 8
    max_n_iter: int = 16
    max_images: int = 32
    """``batch_size × n_iter`` per task."""
    max_prompt_chars: int = 20_000
    max_text_chars: int = 20_000
    """Any other string in a request (styles, names, values in ``override_settings``,
    ``comments``, ``alwayson_scripts`` …); images are bounded as images."""
    max_free_form_bytes: int = 64 * 1024
    """JSON size of each free-form request field (``override_settings``, ``comments``,
    ``alwayson_scripts``, ``script_args``, ``styles``, ``webhook``), images not counted."""
    max_options_bytes: int = 64 * 1024
    """JSON size of a user's stored options (merged into each of their requests)."""
    max_command_bytes: int = 256 * 1024
    """Largest encoded task command; never more than the NATS server's max payload
    (less 4 KiB for headers), whatever this says: a larger one could not be queued."""
    max_input_images: int = 4
    """Images per request (``init_images``)."""
    max_controlnet_units: int = 4
    """Enabled ControlNet units per request (each brings one more input image)."""
    max_input_pixels: int = 4096 * 4096
    """Per input image; larger ones are refused before they are decoded."""
    styles_file: str = ""
    """A1111's ``styles.csv``; empty: ``styles.csv`` in the models folder."""
    max_open_tasks_per_user: int = 64
    """A user's tasks waiting or running at once; one more → 429 (0: no limit)."""
    max_tasks_per_minute: int = 600
    """Task submissions per user in any 60 s, over all gateway replicas (0: no limit)."""
    max_model_bytes: int = 32 * 1024**3
    """Largest model file accepted by upload or registration (SDXL checkpoints are ~7 GB)."""
    max_sse_streams: int = 1000
    """Open ``/tasks/{id}/events`` streams on this gateway; one more → 429 (0: no limit)."""
    max_sse_streams_per_user: int = 16
    """Open event streams of one user on this gateway; one more → 429 (0: no limit)."""
    body_read_timeout_s: float = 60.0
    """A request body not fully received this long after the handler starts reading it
    → 408: slow senders cannot hold the gateway's memory. A model upload (streamed, it
    may take minutes) → 408 when it sends nothing for this long."""
    registry_wait_s: float = 10.0
    """``POST /models`` answers when its copy is done, or 202 after this long."""
