"""diffusers → A1111/LDM single-file key names (SD1.x), written for this project.

diffusers ships only the opposite direction. This one lets the tests (and the demo
model) save a checkpoint exactly the way users upload them; the round trip through
``from_single_file`` is checked bit for bit by the tests.
"""

from __future__ import annotations

import re
from typing import Any

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{tail}" if tail else _RESNET.get(head, head)


def unet_key(key: str, layers_per_block: int, attention_blocks: set[int]) -> str:
    """One diffusers UNet key → LDM. ``attention_blocks``: up-block indices with attention."""
    per = layers_per_block + 1
    fixed = {
        "conv_in.": "input_blocks.0.0.",
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
    }
    for old, new in fixed.items():
        if key.startswith(old):
            return new + key[len(old) :]
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        b, i, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{1 + b * per + i}.0.{_resnet(rest)}"
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        b, i, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{1 + b * per + i}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        b, i, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{b * per + i}.0.{_resnet(rest)}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        b, i, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{b * per + i}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        b = int(m[1])
        slot = 2 if b in attention_blocks else 1
        return f"output_blocks.{b * per + layers_per_block}.{slot}.conv.{m[2]}"
    raise KeyError(f"unmapped UNet key {key}")


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut.", "nin_shortcut.")


def vae_key(key: str, num_blocks: int) -> str:
    key = key.replace("conv_norm_out.", "norm_out.")
    if m := re.match(r"(encoder)\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{m[2]}.block.{m[3]}.{_vae_resnet(m[4])}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"decoder.up.{num_blocks - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3])}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        return f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet(m[3])}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v"}
        head, _, tail = m[2].partition(".")
        if head == "to_out":
            return f"{m[1]}.mid.attn_1.proj_out.{tail.partition('.')[2]}"
        return f"{m[1]}.mid.attn_1.{attention[head]}.{tail}"
    return key


def to_ldm_state_dict(unet: Any, vae: Any, text_encoder: Any) -> dict[str, Any]:
    """The full A1111 single-file state dict of an SD1.x diffusers pipeline."""
    out: dict[str, Any] = {}
    config = unet.config
    with_attention = {
        i for i, kind in enumerate(config.up_block_types) if kind.startswith("CrossAttn")
    }
    for key, tensor in unet.state_dict().items():
        out[UNET_PREFIX + unet_key(key, config.layers_per_block, with_attention)] = tensor
    blocks = len(vae.config.block_out_channels)
    for key, tensor in vae.state_dict().items():
        new = vae_key(key, blocks)
        if ".mid.attn_1." in new and new.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # LDM stores these as 1×1 convolutions
        out[VAE_PREFIX + new] = tensor
    for key, tensor in text_encoder.state_dict().items():
        # transformers >= 5.6 drops the ``text_model.`` prefix; LDM files have it.
        name = key if key.startswith("text_model.") else f"text_model.{key}"
        out[TEXT_PREFIX + name] = tensor
    return {k: v.contiguous() for k, v in out.items()}
