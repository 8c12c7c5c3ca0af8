"""Tiny models with sliding-window / chunked attention, built from transformers' config classes in code, and the
spec dicts that train them (tests of omnigen's attention patterns share these)."""

from __future__ import annotations

import json
from pathlib import Path

import transformers

COMMON = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def gemma3(window=16, layer_types=("sliding_attention", "full_attention"), **kw):
    """Gemma3 text, layer 0 sliding, layer 1 full."""
    return transformers.Gemma3TextConfig(**COMMON, num_hidden_layers=2, head_dim=16, sliding_window=window,
                                         layer_types=list(layer_types), architectures=["Gemma3ForCausalLM"], **kw)


def llama4(chunk=32, **kw):
    """Llama4 text (dense: every layer's MLP, no MoE), layer 0 chunked with RoPE, layer 1 full without (NoPE)."""
    return transformers.Llama4TextConfig(**COMMON, num_hidden_layers=2, head_dim=16, attention_chunk_size=chunk,
                                         intermediate_size_mlp=128, moe_layers=[], no_rope_layers=[1, 0],
                                         interleave_moe_layer_step=0, architectures=["Llama4ForCausalLM"], **kw)


def mistral(window=16, **kw):
    """Mistral: no layer_types, every layer slides."""
    return transformers.MistralConfig(**COMMON, num_hidden_layers=2, head_dim=16, sliding_window=window,
                                      architectures=["MistralForCausalLM"], **kw)


def qwen2(window=16, **kw):
    """Qwen2 with use_sliding_window: layers from max_window_layers on slide."""
    return transformers.Qwen2Config(**COMMON, num_hidden_layers=2, use_sliding_window=True, sliding_window=window,
                                    max_window_layers=1, architectures=["Qwen2ForCausalLM"], **kw)


def write(config, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    return folder


def spec_dict(name: str, config_dir: Path, seq_len=128, sp=2, pack=1, steps=3) -> dict:
    return {"name": name, "model": {"config": str(config_dir)},
            "cluster": {"nodes": 1, "procs_per_node": sp, "device": "cpu", "hardware": "cpu"},
            "train": {"seq_len": seq_len, "micro_batch_size": 1, "global_batch_size": 2, "steps": steps,
                      "lr": 1.0e-3, "seed": 0, "precision": "fp32", "pack_documents": pack},
            "parallel": {"dp_replicate": 1, "dp_shard": 1, "sp": sp, "ep": 1}}
