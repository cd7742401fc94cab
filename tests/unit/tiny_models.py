"""Tiny random-weight causal LMs of every supported architecture, built from configs in code."""

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

WINDOW = 40  # tokens; tests use inputs several windows long

_COMMON = dict(
    vocab_size=260,  # covers the tiny byte-level tokenizer (257 tokens)
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)

ARCHITECTURES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_COMMON)),
    "qwen2": lambda: Qwen2ForCausalLM(
        Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    ),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**_COMMON, head_dim=16)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_COMMON, sliding_window=WINDOW)),
    "gemma2": lambda: Gemma2ForCausalLM(
        Gemma2Config(
            **_COMMON, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=5.0,
            final_logit_softcapping=30.0, query_pre_attn_scalar=16,
        )
    ),
    "gemma3": lambda: Gemma3ForCausalLM(
        Gemma3TextConfig(
            **_COMMON, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
    ),
    "phi3": lambda: Phi3ForCausalLM(
        Phi3Config(**_COMMON, sliding_window=WINDOW, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    ),
}


def tiny_model(name: str, seed: int = 0, attn_implementation: str = "eager"):
    """A tiny model of architecture `name` in eval mode, float32, deterministic weights."""
    torch.manual_seed(seed)
    model = ARCHITECTURES[name]()
    model.set_attn_implementation(attn_implementation)
    return model.eval()
