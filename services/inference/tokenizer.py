"""CLIP tokenizer files built offline from the BPE vocabulary ``open_clip`` ships.

``bpe_simple_vocab_16e6.txt.gz`` (MIT) holds CLIP's merges; the vocabulary is the 256
byte symbols, the same with the end-of-word marker, one entry per merge, then the two
special tokens: 49408 ids. We locate the file without importing ``open_clip`` (that
would import torchvision) and write ``vocab.json``, ``merges.txt`` and — through
transformers — ``tokenizer.json``, once, into a cache folder.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import cache
from pathlib import Path
from typing import Any

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


class TokenizerFilesError(RuntimeError):
    pass


def find_bpe_vocabulary() -> Path:
    spec = importlib.util.find_spec("open_clip")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        candidate = Path(folder) / BPE_FILE
        if candidate.is_file():
            return candidate
    raise TokenizerFilesError(
        f"{BPE_FILE} not found: install open_clip_torch with --no-deps (make install does)"
    )


@cache
def byte_symbols() -> dict[int, str]:
    """Reversible byte → printable character map used by byte-level BPE (GPT-2, CLIP).

    Order matters: the vocabulary lists printable bytes first, then the others.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_vocabulary(bpe_path: Path) -> tuple[dict[str, int], list[str]]:
    lines = gzip.decompress(bpe_path.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : MERGES + 1]
    symbols = list(byte_symbols().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_tokenizer_files(target: Path, *, pad_token: str = EOS) -> Path:
    """Write a loadable CLIP tokenizer folder into ``target`` (idempotent)."""
    if (target / "tokenizer.json").is_file():
        return target
    from transformers import CLIPTokenizer

    vocab, merges = build_vocabulary(find_bpe_vocabulary())
    target.mkdir(parents=True, exist_ok=True)
    (target / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (target / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    # transformers 5: pass the data, not vocab_file=/merges_file= (those give wrong ids).
    # Pairs, not "a b" strings; the annotation in transformers says list[str], wrongly.
    pairs: Any = [tuple(m.split(" ", 1)) for m in merges]
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=pairs,
        model_max_length=77,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=pad_token,
    )
    tokenizer.save_pretrained(str(target))
    return target
