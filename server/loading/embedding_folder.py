"""Which model folders are embedding models, and which of them the engine can serve.

- A sentence-transformers folder (modules.json beside config.json, e.g. Qwen3-Embedding) is an
  embedding model; on a decoder the engine serves it: /v1/embeddings pools as its own Pooling
  module says (engine/pooling.py). With an output head (stored, or tied to the input embedding)
  it also generates. Without one (only the decoder's weights: a Qwen3Model checkpoint) the input
  embedding stands in as the head, so the engine's forward and warm-up run unchanged at no memory
  cost, and generation is refused (`LoadResult.embedding_only`: chat, completions, Messages and
  Responses answer 400).
- An encoder (BERT and its relatives: bidirectional attention) cannot run on the engine, whose
  attention is causal over a paged KV cache: refused at startup with one line (`encoder_reason`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

# Encoder-only model types (transformers' masked-LM models less the encoder-decoders), listed here
# so that the millisecond check before the port opens (sources.check_source) needs no transformers
# import; load_hf_config also asks transformers' own masked-LM mapping.
ENCODER_MODEL_TYPES = frozenset({
    "albert", "bert", "big_bird", "camembert", "convbert", "data2vec-text", "deberta", "deberta-v2", "distilbert",
    "electra", "ernie", "esm", "eurobert", "flaubert", "fnet", "funnel", "gte", "ibert", "jina_embeddings_v3",
    "layoutlm", "longformer", "luke", "megatron-bert", "mobilebert", "modernbert", "mpnet", "mra", "new",
    "nomic_bert", "nystromformer", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer",
    "squeezebert", "xlm", "xlm-roberta", "xlm-roberta-xl", "xmod", "yoso",
})


def encoder_reason(folder: Path, config: dict[str, Any], masked_lm: bool = False) -> Optional[str]:
    """One line saying why `folder` (its config.json as a dict) cannot be served, if it is an
    encoder; None otherwise. masked_lm: transformers builds a masked-LM model for its config."""
    model_type = config.get("model_type")
    if config.get("is_encoder_decoder") or config.get("is_decoder"):
        return None
    if model_type not in ENCODER_MODEL_TYPES and not masked_lm:
        return None
    kind = "an embedding model" if is_sentence_transformers(folder) else "a model"
    return (f"{folder} is {kind} on a '{model_type}' encoder (bidirectional attention), which quantserve cannot "
            "serve: its engine runs decoder (causal) models, embedding models on a decoder included (e.g. "
            "Qwen3-Embedding); serve this one with sentence-transformers or text-embeddings-inference")


def is_sentence_transformers(folder: Path) -> bool:
    """The folder holds a sentence-transformers model (its modules.json)."""
    return (folder / "modules.json").is_file()


def bare_embedding_model(folder: Path, hf_config: Any) -> bool:
    """Whether a checkpoint without an output head is an embedding model to serve as one: a
    sentence-transformers folder, or a config naming only bare decoders (architectures
    ["Qwen3Model"], not "...ForCausalLM"). Any other checkpoint missing its head is an error."""
    if is_sentence_transformers(folder):
        return True
    architectures = getattr(hf_config, "architectures", None) or []
    return bool(architectures) and all(a.endswith("Model") and not a.endswith("LMHeadModel") for a in architectures)
