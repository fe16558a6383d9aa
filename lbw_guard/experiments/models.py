"""Causal language models built from ``transformers`` configs with random initialisation.

Sizes are presets shared by every architecture, so a model-size or architecture comparison
changes only what it names. The two realistic shapes mirror public checkpoints' bodies (hidden
size, depth, heads, MLP width); the vocabulary always comes from our tokenizer, since nothing is
downloaded. GPT-2 and GPT-NeoX have no grouped-query attention: they ignore ``kv_heads``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ARCHITECTURES = ("qwen2", "llama", "gpt2", "neox")


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tie_embeddings: bool = True


SIZES: dict[str, ModelShape] = {
    # CPU-sized: the default stress run and the CI smoke use these.
    "nano": ModelShape(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64),
    # The generalization matrix's size (``lbw-guard stress --matrix``): many cheap runs.
    "micro": ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=192),
    "tiny": ModelShape(hidden=96, layers=2, heads=4, kv_heads=2, intermediate=256),
    "small": ModelShape(hidden=128, layers=3, heads=4, kv_heads=2, intermediate=384),
    "base": ModelShape(hidden=192, layers=4, heads=6, kv_heads=2, intermediate=512),
    # GPU shapes: the bodies of Qwen2.5-0.5B and TinyLlama-1.1B.
    "qwen2.5-0.5b": ModelShape(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864),
    "tinyllama-1.1b": ModelShape(
        hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, tie_embeddings=False
    ),
}


def build_config(arch: str, size: str, vocab_size: int, max_positions: int):
    """A ``transformers`` config for ``arch`` at preset ``size``."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose from {sorted(SIZES)}")
    s = SIZES[size]
    positions = max(max_positions, 128)
    no_special = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=s.hidden, n_layer=s.layers, n_head=s.heads, n_inner=s.intermediate,
            n_positions=positions, tie_word_embeddings=s.tie_embeddings, use_cache=False,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **no_special,
        )
    if arch == "neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size, hidden_size=s.hidden, num_hidden_layers=s.layers,
            num_attention_heads=s.heads, intermediate_size=s.intermediate, max_position_embeddings=positions,
            tie_word_embeddings=s.tie_embeddings, use_cache=False, hidden_dropout=0.0, attention_dropout=0.0,
            **no_special,
        )
    common = dict(
        vocab_size=vocab_size,
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        intermediate_size=s.intermediate,
        max_position_embeddings=positions,
        tie_word_embeddings=s.tie_embeddings,
        use_cache=False,
        **no_special,
    )
    return Qwen2Config(**common) if arch == "qwen2" else LlamaConfig(**common)


def build_model(arch: str, size: str, vocab_size: int, max_positions: int, seed: int) -> torch.nn.Module:
    """A randomly initialised causal LM; the same ``seed`` gives the same weights."""
    from transformers import AutoModelForCausalLM

    config = build_config(arch, size, vocab_size, max_positions)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
