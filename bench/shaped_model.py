"""A random-weight model with a real model's shape, for benchmarks at a size the built-in model is not.

Model hubs are unreachable here, so a 1.7B-parameter model for a side-by-side comes from its shape
alone: SmolLM2-1.7B's config (hidden 2048, 24 layers, MLP 8192, 32 heads, tied embeddings) with the
built-in model's tokenizer and chat template (SmolLM2 uses one tokenizer at every size), weights
drawn N(0, 0.02) (transformers' initializer_range) and norms of one, saved as bf16 safetensors. Speed
does not depend on the weights' values; the load runs with ignore_eos, so every request generates
its full length whatever the text.

For llama.cpp the folder is converted with llama.cpp's own `convert_hf_to_gguf.py` (from the source
tree bench/peers.py builds) to f16, then `llama-quantize` to Q4_0; both outputs are cached.

    python bench/shaped_model.py 1.7b        # writes (once) and prints the folder
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

SHAPES = {
    # huggingface.co/HuggingFaceTB/SmolLM2-1.7B-Instruct/blob/main/config.json
    "1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
             "num_key_value_heads": 32, "head_dim": 64,
             "rope_parameters": {"rope_theta": 130000.0, "rope_type": "default"}},
}
COPIED = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def cache_root() -> Path:
    from quantserve.server.loading.default_model import default_cache_dir

    return default_cache_dir() / "peers"


def shaped_model(name: str) -> Path:
    """The folder of the random-weight model `name` (a key of SHAPES), written on first use."""
    import torch
    from safetensors.torch import save_file

    from quantserve.server.loading.default_model import default_model_folder

    folder = cache_root() / f"smollm2-{name}-random"
    if (folder / "model.safetensors").is_file():
        return folder
    base = default_model_folder()
    config = json.loads((base / "config.json").read_text())
    config.update(SHAPES[name], dtype="bfloat16", _model_name_or_path=f"random weights, SmolLM2-{name} shape")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for file in COPIED:
        if (base / file).is_file():
            shutil.copy(base / file, tmp / file)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))

    h, m, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    hd = config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h),
                   p + "mlp.down_proj.weight": (h, m)}
    gen = torch.Generator().manual_seed(0)
    tensors = {k: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=gen) * config["initializer_range"])
               .to(torch.bfloat16) for k, s in shapes.items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def to_gguf(folder: Path, llama_source: Path, quantize: Path, fmt: str = "Q4_0") -> Path:
    """`folder` as a llama.cpp GGUF in `fmt`, through llama.cpp's own converter and quantizer (cached)."""
    out = folder.with_name(f"{folder.name}.{fmt}.gguf")
    if out.is_file():
        return out
    f16 = folder.with_name(f"{folder.name}.f16.gguf")
    env = dict(os.environ, PYTHONPATH=str(llama_source / "gguf-py"))  # its own gguf, the version it expects
    subprocess.run([sys.executable, str(llama_source / "convert_hf_to_gguf.py"), str(folder), "--outtype", "f16",
                    "--outfile", str(f16)], check=True, env=env)
    tmp = out.with_suffix(".tmp")
    subprocess.run([str(quantize), str(f16), str(tmp), fmt], check=True, capture_output=True)
    tmp.rename(out)
    f16.unlink()
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(shaped_model(sys.argv[1] if len(sys.argv) > 1 else "1.7b"))
