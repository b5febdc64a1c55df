"""A CLIP tokenizer built offline from the BPE vocabulary that open_clip ships.

SD v1.5's tokenizer is OpenAI CLIP's BPE (49,408 tokens). open_clip bundles the same merges as
bpe_simple_vocab_16e6.txt.gz, so the tiny pipeline gets a real CLIP tokenizer without the hub.
The vocabulary is rebuilt the way open_clip's SimpleTokenizer builds it.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from transformers import CLIPTokenizer

VOCAB_SIZE = 49408
MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte-to-unicode table, as open_clip and transformers use it.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def open_clip_bpe_path() -> Path:
    import open_clip.tokenizer

    return Path(open_clip.tokenizer.default_bpe())


def write_clip_tokenizer_files(out_dir: Path, bpe_path: Path | None = None) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json for a slow CLIPTokenizer."""
    bpe_path = bpe_path or open_clip_bpe_path()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{bpe_path}: expected {VOCAB_SIZE} tokens, built {len(vocab)}")
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        # SD v1.5 pads with <|endoftext|>; pad_token="!" would turn every "!" into a pad.
        "pad_token": "<|endoftext|>",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def load_clip_tokenizer(path: Path) -> CLIPTokenizer:
    """Load a CLIPTokenizer and check it really loaded (a failed load comes back with 2 tokens)."""
    tok = CLIPTokenizer.from_pretrained(str(path))
    if len(tok) < VOCAB_SIZE:
        raise ValueError(f"{path}: CLIP tokenizer has {len(tok)} tokens, expected at least {VOCAB_SIZE}")
    return tok


def build_clip_tokenizer(out_dir: Path) -> CLIPTokenizer:
    return load_clip_tokenizer(write_clip_tokenizer_files(out_dir))
