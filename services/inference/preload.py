"""What a worker imports before it can load anything, imported once by the fork server.

The local backend forks its workers from a server process that has imported this module
(:mod:`services.scheduler.forkserver`), so a new worker starts with torch, diffusers,
transformers and sdswarm's inference modules already in memory. Importing it must never
touch CUDA: a CUDA context does not survive ``fork``. ``PYTORCH_NVML_BASED_CUDA_CHECK``
makes any ``torch.cuda.is_available()`` during these imports ask NVML, which is fork-safe,
instead of initialising the driver; a worker that finds CUDA initialised anyway starts a
fresh interpreter instead (:func:`services.inference.zygote.run_worker`).
"""

from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import diffusers
import torch  # noqa: F401
import transformers

import services.inference.__main__
import services.inference.loader
import services.inference.samplers
import services.inference.tokenizer  # noqa: F401
from proto import ModelFamily
from services.inference.family import Variant, traits

# diffusers and transformers import lazily: resolve what loading a checkpoint reaches for
# (every family's pipeline classes, which pull in the CLIP text models and tokenizers).
for _family in ModelFamily:
    _traits = traits(_family)
    for _variant in Variant:
        getattr(diffusers, _traits.class_name(_variant), None)
for _name in ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer"):
    getattr(transformers, _name)
