"""A1111 prompt syntax for SD1/SD2/SDXL: emphasis, ``BREAK`` and prompts past 75 tokens.

- ``(words)`` multiplies the attention to ``words`` by 1.1, ``[words]`` divides it by 1.1,
  ``(words:1.5)`` sets the factor; brackets nest and multiply; ``\\(`` and ``\\)`` are
  literal brackets; an unclosed bracket applies to the rest of the prompt, as in A1111.
- The prompt is cut into chunks of 75 tokens (``BREAK`` starts a new chunk); each chunk
  is encoded on its own between BOS and EOS, and the chunks' embeddings are concatenated,
  so a long prompt is not truncated. The negative prompt is padded to as many chunks.
- Each token's embedding is scaled by its weight, then the whole is rescaled to its
  original mean (A1111's "Original" emphasis), so weights shift attention without
  changing the overall magnitude.
- SDXL: each chunk goes through both text encoders (penultimate layers, concatenated
  features, weighted together); the pooled embedding is the second encoder's for the
  first chunk, as in A1111.
"""

from __future__ import annotations

import re
from typing import Any

import torch

CHUNK_TOKENS = 75
ROUND_UP = 1.1
_TOKEN = re.compile(
    r"\\[()\[\]\\]|\(|\[|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|\)|]|\bBREAK\b|[^\\()\[\]:B]+|[:B]"
)

Fragment = tuple[str, float]
BREAK = ("BREAK", -1.0)


def parse_attention(text: str) -> list[Fragment]:
    """``(text, weight)`` fragments of a prompt; ``BREAK`` is ``("BREAK", -1)``."""
    fragments: list[list[Any]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            fragments.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(fragments))
        elif token == "[":
            square_open.append(len(fragments))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND_UP)
        elif token == "]" and square_open:
            multiply(square_open.pop(), 1 / ROUND_UP)
        elif token == "BREAK":
            fragments.append(["BREAK", -1.0])
        else:
            fragments.append([token, 1.0])
    for start in round_open:
        multiply(start, ROUND_UP)
    for start in square_open:
        multiply(start, 1 / ROUND_UP)
    merged: list[Fragment] = []
    for text_part, weight in fragments:  # join neighbours of equal weight
        if merged and merged[-1][1] == weight and weight != -1.0:
            merged[-1] = (merged[-1][0] + text_part, weight)
        else:
            merged.append((text_part, weight))
    return [(t, w) for t, w in merged if t] or [("", 1.0)]


def needs_own_encoder(prompt: str, tokenizer: Any) -> bool:
    """Whether diffusers' plain encoding would differ from A1111's for this prompt."""
    if re.search(r"[()\[\]]|BREAK", prompt):
        return True
    return len(tokenizer(prompt, add_special_tokens=False).input_ids) > CHUNK_TOKENS


def _chunks(pipe: Any, prompt: str) -> list[tuple[list[int], list[float]]]:
    tokenizer = pipe.tokenizer
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []

    def close() -> None:
        nonlocal ids, weights
        chunks.append((ids, weights))
        ids, weights = [], []

    for text, weight in parse_attention(prompt):
        if weight == -1.0:
            close()
            continue
        if hasattr(pipe, "maybe_convert_prompt"):  # multi-vector textual inversions
            text = pipe.maybe_convert_prompt(text, tokenizer)
        for token in tokenizer(text, add_special_tokens=False).input_ids:
            if len(ids) == CHUNK_TOKENS:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close()
    return chunks


def _input_ids(tokenizer: Any, ids: list[int], device: Any) -> torch.Tensor:
    """BOS, the chunk, EOS, then the tokenizer's padding up to 77."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    filler = CHUNK_TOKENS - len(ids)
    tokens = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id, *[pad] * filler]
    return torch.tensor([tokens], device=device)


def _scale(weights: list[float]) -> list[float]:
    return [1.0, *weights, 1.0, *[1.0] * (CHUNK_TOKENS - len(weights))]


def _encode_chunk(pipe: Any, ids: list[int], weights: list[float], skip: int) -> torch.Tensor:
    encoder = pipe.text_encoder
    output = encoder(_input_ids(pipe.tokenizer, ids, encoder.device), output_hidden_states=True)
    z: torch.Tensor
    if skip:
        norm = getattr(encoder, "final_layer_norm", None) or encoder.text_model.final_layer_norm
        z = norm(output.hidden_states[-(skip + 1)])
    else:
        z = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    return _weighted(z, _scale(weights))


def _encode_chunk_xl(
    pipe: Any, ids: list[int], weights: list[float], skip: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk through both SDXL encoders: (features, pooled)."""
    first, second = pipe.text_encoder, pipe.text_encoder_2
    out_1 = first(_input_ids(pipe.tokenizer, ids, first.device), output_hidden_states=True)
    out_2 = second(_input_ids(pipe.tokenizer_2, ids, second.device), output_hidden_states=True)
    z = torch.cat([out_1.hidden_states[-(skip + 2)], out_2.hidden_states[-(skip + 2)]], dim=-1)
    return _weighted(z, _scale(weights)), out_2.text_embeds


def _weighted(z: torch.Tensor, scale: list[float]) -> torch.Tensor:
    if all(w == 1.0 for w in scale):
        return z
    factors = torch.tensor(scale, dtype=z.dtype, device=z.device)[None, :, None]
    original_mean = z.mean()
    weighted: torch.Tensor = z * factors
    new_mean = weighted.mean()
    if torch.isfinite(new_mean) and new_mean.abs() > 1e-6:
        weighted = weighted * (original_mean / new_mean)
    return weighted


def encode_weighted(
    pipe: Any, prompt: str, negative: str, skip: int, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt and negative embeddings with A1111 semantics, ``count`` times each."""
    positive, negative_chunks = _chunks(pipe, prompt), _chunks(pipe, negative)
    length = max(len(positive), len(negative_chunks))
    positive += [([], [])] * (length - len(positive))
    negative_chunks += [([], [])] * (length - len(negative_chunks))
    encode = _encode_chunk
    pos = torch.cat([encode(pipe, ids, w, skip) for ids, w in positive], dim=1)
    neg = torch.cat([encode(pipe, ids, w, skip) for ids, w in negative_chunks], dim=1)
    return pos.repeat(count, 1, 1), neg.repeat(count, 1, 1)


def encode_weighted_xl(
    pipe: Any, prompt: str, negative: str, skip: int, count: int
) -> dict[str, torch.Tensor]:
    """The four SDXL conditioning tensors with A1111 semantics, ``count`` times each."""
    positive, negative_chunks = _chunks(pipe, prompt), _chunks(pipe, negative)
    length = max(len(positive), len(negative_chunks))
    positive += [([], [])] * (length - len(positive))
    negative_chunks += [([], [])] * (length - len(negative_chunks))
    out: dict[str, torch.Tensor] = {}
    for name, chunks in (("prompt_embeds", positive), ("negative_prompt_embeds", negative_chunks)):
        encoded = [_encode_chunk_xl(pipe, ids, w, skip) for ids, w in chunks]
        pooled_name = name.replace("prompt_embeds", "pooled_prompt_embeds")
        out[name] = torch.cat([z for z, _ in encoded], dim=1).repeat(count, 1, 1)
        out[pooled_name] = encoded[0][1].repeat(count, 1)
    return out
