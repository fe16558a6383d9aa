"""Tokenizers for the stress suite: a BPE trained on the training split (cached), or raw bytes.

The vocabulary size matters for what a collapse looks like: a collapsed model falls back to
roughly unigram statistics, whose perplexity grows with the vocabulary. With 256 byte symbols a
collapsed run reads a perplexity near 20, so a BPE vocabulary of several thousand is the default.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

EOS = "<|endoftext|>"


@dataclass
class TextTokenizer:
    """A minimal encode interface shared by the BPE and byte tokenizers."""

    kind: str
    vocab_size: int
    eos_id: int
    _bpe: object | None = None  # tokenizers.Tokenizer for kind == "bpe"

    def encode_documents(self, docs: list[str]) -> torch.Tensor:
        """All documents as one int64 stream, each followed by the end-of-text token."""
        if self.kind == "byte":
            parts = []
            for d in docs:
                parts.append(torch.frombuffer(bytearray(d.encode("utf-8")), dtype=torch.uint8))
                parts.append(torch.tensor([self.eos_id], dtype=torch.uint8).view(-1))
            return torch.cat([p.to(torch.int64) for p in parts]) if parts else torch.empty(0, dtype=torch.int64)
        encodings = self._bpe.encode_batch(docs)  # type: ignore[union-attr]
        ids: list[int] = []
        for enc in encodings:
            ids.extend(enc.ids)
            ids.append(self.eos_id)
        return torch.tensor(ids, dtype=torch.int64)


def byte_tokenizer() -> TextTokenizer:
    # 256 byte values; the NUL byte never occurs in source text, so it doubles as end-of-text.
    return TextTokenizer(kind="byte", vocab_size=256, eos_id=0)


def bpe_tokenizer(train_docs: list[str], vocab_size: int, cache_dir: Path, corpus_key: str) -> TextTokenizer:
    """Train (or load from ``cache_dir``) a byte-level BPE on ``train_docs``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 512:
        raise ValueError(f"BPE vocab_size must be at least 512, got {vocab_size}")
    key = hashlib.sha1(json.dumps(["bpe-v1", corpus_key, vocab_size]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / "tokenizers" / f"bpe-{key}.json"
    if path.exists():
        tok = Tokenizer.from_file(str(path))
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(train_docs, trainer=trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tok.save(str(tmp))
        tmp.replace(path)  # atomic: a concurrent run never reads a half-written file
    return TextTokenizer(kind="bpe", vocab_size=tok.get_vocab_size(), eos_id=tok.token_to_id(EOS), _bpe=tok)
