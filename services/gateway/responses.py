"""Response bodies of the routes beyond the seed's tasks: the gateway's own (models,
functions, webhooks) and AUTOMATIC1111's public API shapes (field names and types as
its clients read them). Each handler builds one of these and sends it with
:func:`services.gateway.openapi.respond`, and the route table names it, so the
OpenAPI document says exactly what is sent (``additionalProperties: false``).

Fields without a default are always sent (``null`` included); fields with one are left
out when they have it (``omit_defaults``): those are the keys a handler sends only
sometimes.
"""

from __future__ import annotations

from typing import Any

from services.gateway.openapi import _Strict


class Empty(_Strict):
    """``{}``: A1111's answer to interrupt and skip."""


# --- the gateway's own ----------------------------------------------------------------


class FunctionInfo(_Strict):
    """A checkpoint's worker pool (the seed's function)."""

    functionName: str
    model: str
    state: str
    replicas: int
    share: int
    backlog: int
    running: int
    minInstances: int
    maxInstances: int | None
    idleTimeout: float | None
    maxBatch: int | None
    """Tasks a worker takes at once; null: the scheduler's default (SDSWARM_MAX_BATCH)."""
    warmUntil: str | None
    coldStartSeconds: float | None
    """The slowest live worker's measured cold start (process start → ready)."""
    coldStartPhases: dict[str, float]
    resources: dict[str, Any]
    """The pool's other settings as given to ``/batch_update_sd_resource`` (free-form)."""


class FunctionsList(_Strict):
    status: str
    functions: list[FunctionInfo]
    errMsg: str


class FunctionUpdated(_Strict):
    functionName: str
    model: str
    status: str
    unsupported: list[str]
    """Settings the backend stored but does not apply."""


class FunctionFailure(_Strict):
    model: str
    err: str


class FunctionsUpdate(_Strict):
    """``status: fail`` (HTTP 500, as the seed answers) when a named model is unknown."""

    status: str
    functions: list[FunctionUpdated]
    failFuncList: list[FunctionFailure]
    errMsg: str


class FunctionMissing(_Strict):
    functionName: str
    err: str


class FunctionsDeleted(_Strict):
    """``status: fail`` with ``fails`` (HTTP 500, as the seed answers) when a named
    function does not exist."""

    status: str
    fails: list[FunctionMissing] | None = None


# --- AUTOMATIC1111 --------------------------------------------------------------------


class A1111Checkpoint(_Strict):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: None


class A1111Vae(_Strict):
    model_name: str
    filename: str


class A1111Lora(_Strict):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any]


class A1111Embedding(_Strict):
    step: int | None
    sd_checkpoint: str | None
    sd_checkpoint_name: str | None
    shape: int | None
    vectors: int | None


class A1111Embeddings(_Strict):
    loaded: dict[str, A1111Embedding]
    skipped: dict[str, A1111Embedding]


class MemoryFigures(_Strict):
    """Bytes; only ``error`` when the figures are not reported to the caller."""

    free: int | None = None
    used: int | None = None
    total: int | None = None
    error: str | None = None


class MemoryCurrent(_Strict):
    current: int


class CudaMemory(_Strict):
    """Summed over the workers on CUDA devices; only ``error`` when there is none."""

    system: MemoryFigures | None = None
    active: MemoryCurrent | None = None
    allocated: MemoryCurrent | None = None
    error: str | None = None


class WorkerMemory(_Strict):
    worker: str
    model: str
    state: str
    rss: int
    cudaFree: int | None
    cudaTotal: int | None
    cudaAllocated: int | None


class A1111Memory(_Strict):
    """``workers`` (an sdswarm extension) for administrators only."""

    ram: MemoryFigures
    cuda: CudaMemory
    workers: list[WorkerMemory] | None = None


class A1111Sampler(_Strict):
    name: str
    aliases: list[str]
    options: dict[str, str]


class A1111Scheduler(_Strict):
    name: str
    label: str
    aliases: list[str] | None
    default_rho: float
    need_inner_model: bool


class A1111PromptStyle(_Strict):
    name: str
    prompt: str
    negative_prompt: str


class A1111Upscaler(_Strict):
    name: str
    model_name: str | None
    model_path: str | None
    model_url: str | None
    scale: float


class A1111FaceRestorer(_Strict):
    name: str
    cmd_dir: str


# --- the ControlNet extension's API ---------------------------------------------------


class ControlNetModels(_Strict):
    model_list: list[str]


class ControlNetSlider(_Strict):
    name: str
    value: float
    min: float
    max: float


class ControlNetModule(_Strict):
    model_free: bool
    sliders: list[ControlNetSlider]


class ControlNetModules(_Strict):
    module_list: list[str]
    module_detail: dict[str, ControlNetModule]


class ControlNetVersion(_Strict):
    version: int


class ControlNetSettings(_Strict):
    control_net_unit_count: int
