"""/v1/embeddings through the official openai client on a real server (unquantized, float32
products), against transformers' own forward of the same weights with the same pooling; the
pooling choices on a tiny random model against a hand-written forward per prompt."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from quantserve.server.engine.pooling import Pooling, batches, embed_batch, pooling_for

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
    np.testing.assert_allclose(as_ids, as_text, atol=1e-6)
    raw = thinking_server.post("/v1/embeddings", {"model": MODEL, "input": [ids, ids[:3]],
                                                  "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, as_text, atol=1e-6)


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


@pytest.mark.parametrize("mode", ["mean", "last", "cls"])
def test_pooling_modes_against_one_prompt_at_a_time(mode):
    model = _tiny_model()
    prompts = [[1, 5, 9, 3, 7, 2], [4, 4], [8, 1, 6]]
    got = torch.tensor(embed_batch(model, prompts, Pooling(mode, False, "test")))
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            hidden = model.model(input_ids=torch.tensor([prompt])).last_hidden_state[0]
        expected = {"mean": hidden.mean(0), "last": hidden[-1], "cls": hidden[0]}[mode]
        torch.testing.assert_close(got[row], expected, atol=1e-5, rtol=1e-5)


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


def test_batches_keep_the_padded_size_within_the_budget():
    prompts = [[1] * n for n in (5, 1, 9, 3, 9, 2)]
    groups = batches(prompts, 10)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for group in groups:
        assert len(group) == 1 or len(group) * max(len(prompts[i]) for i in group) <= 10
