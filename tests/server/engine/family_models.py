"""Small random-weight models of the families people serve, built from their real configs.

Each entry keeps what makes the family what it is (head dim and grouped-query ratio, rope type,
base and rotary fraction, sliding-window pattern, soft-capping, norms, biases, activation, tied
or untied head) and shrinks the rest: 2-3 layers, a 512-token vocabulary, narrow MLPs, sometimes
fewer heads (same head dim and ratio), and windows of 12-24 tokens so that they are shorter than
the test prompts. The source config of each is named on its line.
"""

from __future__ import annotations

import functools

import torch

VOCAB = 512
WINDOW = 16

COMMON = dict(vocab_size=VOCAB, initializer_range=0.2, max_position_embeddings=4096,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)

# longrope factors for a rotary dim: short ~1, long > 1 (Phi-3/4 "128k" configs have such lists)
def _longrope(rotary_dim: int, original: int, max_len: int = 4096) -> dict:
    half = rotary_dim // 2
    return {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": original,
            "short_factor": [1.0 + 0.02 * i for i in range(half)],
            "long_factor": [1.5 + 0.3 * i for i in range(half)], "factor": max_len / original}


FAMILIES: dict[str, tuple[str, dict]] = {
    # meta-llama/Llama-3.2-1B: 32 heads / 8 kv heads x 64, llama3 rope scaling, tied
    "llama3": ("LlamaConfig", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=32,
                                   num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                   max_position_embeddings=131072,
                                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8192})),
    # Qwen/Qwen2.5-0.5B: 14 heads / 2 kv heads x 64, q/k/v biases, rope 1e6, tied
    "qwen2.5": ("Qwen2Config", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=14,
                                    num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                    rope_theta=1000000.0, use_sliding_window=False)),
    # Qwen/Qwen3-0.6B: 16 heads / 8 kv heads x 128, q/k RMSNorm per head, rope 1e6, tied
    "qwen3": ("Qwen3Config", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=16,
                                  num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                  rope_theta=1000000.0)),
    # google/gemma-2-2b: 8 heads / 4 kv heads x 256, query_pre_attn_scalar 256, attention and final
    # logit soft-capping 50 / 30, sliding and global layers alternating, gelu_tanh, sandwich norms
    "gemma2": ("Gemma2Config", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=8,
                                    num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=WINDOW,
                                    hidden_activation="gelu_pytorch_tanh", rope_theta=10000.0)),
    # google/gemma-3-270m (global rope of gemma-3-4b: linear x8): 4 heads / 1 kv head x 256, q/k
    # norms, local (1e4) and global (1e6) rope bases, 5 sliding : 1 global (here 2 : 1)
    "gemma3": ("Gemma3TextConfig", dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
        head_dim=256, query_pre_attn_scalar=256, sliding_window=WINDOW,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}})),
    # mistralai/Mistral-7B-v0.1: 32 heads / 8 kv heads x 128, every layer slides, untied
    "mistral": ("MistralConfig", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=32,
                                      num_key_value_heads=8, head_dim=128, sliding_window=WINDOW, rms_norm_eps=1e-5,
                                      tie_word_embeddings=False, rope_theta=10000.0)),
    # mistralai/Ministral-8B-Instruct-2410: 32 heads / 8 kv heads x 128, sliding and global layers
    # interleaved (here 1 : 1), rope 1e8, untied
    "ministral": ("MinistralConfig", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                          sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                                          rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=100000000.0)),
    # google/gemma-2b: 8 heads / 1 kv head x 256 (MQA), (1 + w) RMSNorm, scaled embedding, gelu_tanh, tied
    "gemma": ("GemmaConfig", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                                  num_key_value_heads=1, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                                  rope_theta=10000.0)),
    # microsoft/Phi-3-mini-128k-instruct: MHA x 96 (here 4 heads), fused qkv / gate_up, longrope,
    # every layer slides (2047), untied
    "phi3": ("Phi3Config", dict(hidden_size=384, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4, sliding_window=WINDOW + 4, tie_word_embeddings=False,
                                rope_parameters=_longrope(96, original=48), original_max_position_embeddings=48)),
    # microsoft/Phi-4-mini-instruct: GQA 3:1 x 128 (here 6 / 2 heads), partial rotary 0.75, longrope, tied
    "phi4": ("Phi3Config", dict(hidden_size=768, intermediate_size=256, num_hidden_layers=2, num_attention_heads=6,
                                num_key_value_heads=2, tie_word_embeddings=True, sliding_window=None,
                                partial_rotary_factor=0.75, original_max_position_embeddings=48,
                                rope_parameters={**_longrope(96, original=48), "partial_rotary_factor": 0.75})),
    # EleutherAI/pythia-70m: 8 heads x 64, rotary on 25% of each head, parallel residual,
    # LayerNorms and biases, plain gelu MLP, untied
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=512, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                                       rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)),
    # allenai/OLMo-2-0425-1B: MHA x 128 (here 4 heads), q/k RMSNorm over the whole projection,
    # norms after each branch, rope 5e5, untied
    "olmo2": ("Olmo2Config", dict(hidden_size=512, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=500000.0,
                                  tie_word_embeddings=False)),
    # allenai/Olmo-3-1025-7B: as OLMo 2, plus 3 sliding : 1 global layers (here 1 : 1), rope 5e5, untied
    "olmo3": ("Olmo3Config", dict(hidden_size=512, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=4, rms_norm_eps=1e-6, sliding_window=WINDOW,
                                  layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False)),
    # HuggingFaceTB/SmolLM2-135M (Llama-shaped): 9 heads / 3 kv heads x 64, rope 1e5, tied
    "smollm2": ("LlamaConfig", dict(hidden_size=576, intermediate_size=256, num_hidden_layers=2, num_attention_heads=9,
                                    num_key_value_heads=3, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                    rope_theta=100000.0)),
    # HuggingFaceTB/SmolLM3-3B: 16 heads / 4 kv heads x 128, no rope on every 4th layer (here the 2nd), tied
    "smollm3": ("SmolLM3Config", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=16,
                                      num_key_value_heads=4, head_dim=128, rope_theta=5000000.0, no_rope_layers=[1, 0],
                                      tie_word_embeddings=True)),
}

# The rope types transformers ships, on a Llama: (parameters, max_position_embeddings). Lengths
# in the tests pass the dynamic / longrope thresholds.
ROPE_TYPES: dict[str, tuple[dict, int]] = {
    "default": ({"rope_type": "default", "rope_theta": 10000.0}, 4096),
    "linear": ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, 4096),
    "dynamic": ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 40),
    "yarn": ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024}, 4096),
    "llama3": ({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}, 4096),
    "longrope": (_longrope(64, original=40), 4096),
}


def build_config(family: str):
    import transformers

    cls_name, values = FAMILIES[family]
    return getattr(transformers, cls_name)(**{**COMMON, **values})


def rope_config(rope_type: str):
    import transformers

    params, max_len = ROPE_TYPES[rope_type]
    values = {**COMMON, **dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=64, rope_parameters=params,
                               max_position_embeddings=max_len)}
    return transformers.LlamaConfig(**values)


def build_model(config, quantize: bool = True):
    """A random model (seeded) in eval mode, 4-bit (NF4) unless told not, with its embeddings
    and head at 16 bits as the engine serves them (so transformers' generate computes the same)."""
    import transformers

    import quantserve.quant as quant
    from quantserve.server.engine.models.sixteen_bit import to_16bit

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    if quantize:
        quant.quantize_model(model, quant.QuantConfig())
    to_16bit(model)
    return model.eval()


@functools.lru_cache(maxsize=None)
def family_model(family: str):
    return build_model(build_config(family))


def prompts(count: int = 8, seed: int = 1) -> list[list[int]]:
    """Random prompts of many lengths (1 to ~100 tokens: most longer than the windows), two of
    them sharing a 2-block prefix with another."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 5, 17, 33, 64, 90, 40, 7, 100, 12][:count]
    out = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]
    out.append(out[4][:40] + [7, 8, 9])
    out.append(out[5][:32] + [11])
    return out
