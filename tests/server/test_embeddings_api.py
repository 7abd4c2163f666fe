"""/v1/embeddings through the official openai client on a real server (unquantized, float32
products), against transformers' own forward of the same weights with the same pooling; the
pooling read from a sentence-transformers folder. The engine side (each forward path, chunks,
the prefix cache, waiting for blocks) is tests/server/engine/test_embed_engine.py."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from quantserve.server.engine.pooling import Pooling, pooling_for

from .apis_helpers import MODEL, thinking_server  # noqa: F401 - the fixture

TEXTS = ["The capital of France is Paris.", "A cat sat on the mat.", "hello"]


@pytest.fixture(scope="module")
def reference(default_model_dir):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModel.from_pretrained(default_model_dir, torch_dtype=torch.float32).eval()

    def embed(text: str) -> np.ndarray:
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = model(input_ids=ids).last_hidden_state[0]
        vector = hidden.mean(0)
        return (vector / vector.norm()).numpy()

    return tokenizer, embed


def test_matches_transformers_and_batch_equals_one_by_one(thinking_server, reference):
    tokenizer, embed = reference
    client = thinking_server.openai()
    batch = client.embeddings.create(model=MODEL, input=TEXTS)
    assert [d.index for d in batch.data] == [0, 1, 2] and batch.model == MODEL
    assert batch.usage.prompt_tokens == sum(len(tokenizer(t).input_ids) for t in TEXTS) == batch.usage.total_tokens
    for text, item in zip(TEXTS, batch.data):
        got = np.array(item.embedding)
        assert got.shape == (576,) and abs(np.linalg.norm(got) - 1) < 1e-5
        assert float(got @ embed(text)) > 0.999  # the input embedding is kept in 16 bits while serving
        single = np.array(client.embeddings.create(model=MODEL, input=text).data[0].embedding)
        np.testing.assert_allclose(single, got, atol=2e-4)
    same = client.embeddings.create(model=MODEL, input=["same text", "same text"]).data
    assert float(np.array(same[0].embedding) @ np.array(same[1].embedding)) == pytest.approx(1.0, abs=1e-6)


def test_token_ids_and_base64(thinking_server, reference):
    tokenizer, _ = reference
    client = thinking_server.openai()
    as_text = np.array(client.embeddings.create(model=MODEL, input=TEXTS[0]).data[0].embedding)
    ids = tokenizer(TEXTS[0]).input_ids
    as_ids = np.array(client.embeddings.create(model=MODEL, input=ids).data[0].embedding)
    # Two requests: the same tokens, computed again (bfloat16 keys and values round the small
    # differences of another thread count), so as close as a batch is to one by one.
    np.testing.assert_allclose(as_ids, as_text, atol=2e-4)
    raw = thinking_server.post("/v1/embeddings", {"model": MODEL, "input": [ids, ids[:3]],
                                                  "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, as_text, atol=2e-4)


def test_bad_input_gets_openais_error_shape(thinking_server):
    for body, status, param in [
        ({"input": []}, 400, "input"),
        ({"input": ""}, 400, "input"),
        ({"input": "hi", "dimensions": 64}, 400, "dimensions"),  # not a Matryoshka model
        ({"input": [[10**9]]}, 400, "input"),
        ({"input": "hi", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"input": "hi " * 9000}, 400, "input"),
        ({"input": "hi", "model": "nope"}, 404, "model"),
    ]:
        r = thinking_server.post("/v1/embeddings", {"model": MODEL, **body})
        assert r.status_code == status, r.text
        assert set(r.json()) == {"error"} and r.json()["error"]["param"] == param, r.text


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_pooling_read_from_a_sentence_transformers_folder(tmp_path):
    model = _tiny_model()
    assert pooling_for(model) == Pooling("mean", True, "mean of the last hidden state")
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_lasttoken": True}))
    model.config._name_or_path = str(tmp_path)
    assert pooling_for(model) == Pooling("last", True, "sentence-transformers config")


# --------------------------------------------------------------------- embedding model folders

ST_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]


def _sentence_transformers_files(folder, pooling: dict) -> None:
    """modules.json, 1_Pooling/config.json and 2_Normalize/ as sentence-transformers writes them."""
    (folder / "modules.json").write_text(json.dumps(ST_MODULES))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (folder / "2_Normalize").mkdir()


def _embedding_folder(base, default_model_dir, name: str, model) -> str:
    """`model` saved as a folder with the default model's tokenizer (its vocabulary: 49152 ids)."""
    from transformers import AutoTokenizer

    folder = base / name
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model_dir).save_pretrained(folder)
    return str(folder)


def _qwen3_config(tie: bool):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                       tie_word_embeddings=tie, initializer_range=0.2)


LAST_TOKEN = {"word_embedding_dimension": 64, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
              "pooling_mode_lasttoken": True, "include_prompt": True}


@pytest.fixture(scope="module")
def embedding_folders(tmp_path_factory, default_model_dir):
    """Tiny random-weight folders shaped as Qwen3-Embedding-0.6B (a Qwen3 causal LM, tied head,
    sentence-transformers last-token pooling + normalize), as Qwen3-Embedding-8B (the bare
    decoder's weights: Qwen3Model, untied, so no head), and as a BERT sentence encoder."""
    from transformers import BertConfig, BertModel, Qwen3ForCausalLM, Qwen3Model

    base = tmp_path_factory.mktemp("embedding_models")
    torch.manual_seed(0)
    folders = {}
    folders["qwen3_lm"] = _embedding_folder(base, default_model_dir, "qwen3-embedding-lm",
                                            Qwen3ForCausalLM(_qwen3_config(tie=True)))
    folders["qwen3_bare"] = _embedding_folder(base, default_model_dir, "qwen3-embedding-bare",
                                              Qwen3Model(_qwen3_config(tie=False)))
    bert = BertModel(BertConfig(vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=512))
    folders["bert"] = _embedding_folder(base, default_model_dir, "bert-embedding", bert)
    for key, pooling in (("qwen3_lm", LAST_TOKEN), ("qwen3_bare", LAST_TOKEN),
                         ("bert", {**LAST_TOKEN, "pooling_mode_lasttoken": False, "pooling_mode_mean_tokens": True})):
        _sentence_transformers_files(base / folders[key].rsplit("/", 1)[-1], pooling)
    return folders


def _last_token_reference(folder: str):
    """transformers' own forward of the folder's decoder, last token, L2-normalized."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()

    def embed(text: str) -> np.ndarray:
        with torch.no_grad():
            hidden = model(input_ids=tokenizer(text, return_tensors="pt").input_ids).last_hidden_state[0]
        return torch.nn.functional.normalize(hidden[-1], dim=-1).numpy()

    return embed


def _check_embeddings(server, name: str, reference) -> None:
    client = server.openai()
    batch = client.embeddings.create(model=name, input=TEXTS).data
    for text, item in zip(TEXTS, batch):
        got = np.array(item.embedding)
        assert got.shape == (64,) and float(got @ reference(text)) > 0.999
        single = np.array(client.embeddings.create(model=name, input=text).data[0].embedding)
        np.testing.assert_allclose(single, got, atol=2e-4)


EXACT = ("--quant", "none", "--matmul-precision", "highest", "--kv-cache-dtype", "float32")


def test_qwen3_embedding_folder_with_a_head_embeds_and_chats(embedding_folders):
    from .apis_helpers import serving

    folder = embedding_folders["qwen3_lm"]
    for server in serving(folder, "--served-model-name", "qwen3-emb", *EXACT):
        _check_embeddings(server, "qwen3-emb", _last_token_reference(folder))
        chat = server.post("/v1/chat/completions", {"model": "qwen3-emb", "max_tokens": 4, "ignore_eos": True,
                                                     "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 4, chat.text


def test_bare_qwen3_embedding_folder_serves_embeddings_only(embedding_folders):
    from .apis_helpers import serving

    folder = embedding_folders["qwen3_bare"]
    for server in serving(folder, "--served-model-name", "qwen3-bare", *EXACT):
        _check_embeddings(server, "qwen3-bare", _last_token_reference(folder))
        for path, body in [
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
            ("/v1/completions", {"prompt": "hi", "max_tokens": 4}),
            ("/v1/responses", {"input": "hi", "max_output_tokens": 4}),
        ]:
            r = server.post(path, {"model": "qwen3-bare", **body})
            assert r.status_code == 400, r.text
            assert "embedding model" in r.json()["error"]["message"], r.text
        r = server.post("/v1/messages", {"model": "qwen3-bare", "max_tokens": 4,
                                         "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["type"] == "error", r.text
        assert "embedding model" in r.json()["error"]["message"], r.text


def test_bert_folder_refused_at_startup_with_one_line(embedding_folders):
    import subprocess
    import sys

    folder = embedding_folders["bert"]
    done = subprocess.run([sys.executable, "-m", "quantserve.server", "serve", folder, "--port", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("quantserve serve: error: ") and "'bert' encoder" in last, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
