"""--forward on a real server: the path chosen at start is shown on /health and /metrics, the
answers through each path are transformers' greedy answer, and a path that cannot serve the model
is refused at startup with a clear message."""

from __future__ import annotations

import httpx
import pytest
import torch

from quantserve.server.testing import parse_metrics

from .serving import MODEL, QUESTION, run_serve, start_server


@pytest.fixture(scope="module")
def transformers_answer(default_model_dir):
    """Greedy answer of transformers' own generate on the default model as the server loads it (NF4
    weights, float32 compute), at highest matmul precision."""
    from quantserve.server.loading.loader import LoadConfig, load_model

    torch.set_float32_matmul_precision("highest")
    loaded = load_model(LoadConfig(model=str(default_model_dir)))
    tok = loaded.tokenizer
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = loaded.model.generate(**ids, max_new_tokens=8, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("forward, attention", [
    ("fused", "native"),  # the CPU default; the other two paths are also covered in-process (tests/server/engine)
    pytest.param("layers", "torch", marks=pytest.mark.slow),
    pytest.param("transformers", "native", marks=pytest.mark.slow),
])
def test_each_forward_path_serves_and_reports_itself(default_model_dir, transformers_answer, forward, attention):
    """A float32 KV cache at highest precision: every path gives transformers' greedy text on the
    same weights; /health says which path and backend run, /metrics counts its steps."""
    flags = ("--forward", forward, "--attention-backend", attention, "--kv-cache-dtype", "float32",
             "--matmul-precision", "highest")
    with start_server(*flags, api_key=None) as server:
        health = httpx.get(f"{server.url}/health").json()
        execution = health["execution"][MODEL]
        assert (execution["forward"], execution["attention_backend"]) == (forward, attention)
        assert execution["cuda_graphs"] != "on" and execution["forward_reason"]
        answer = server.client().chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8,
                                                         temperature=0)
        assert answer.choices[0].message.content == transformers_answer
        text = httpx.get(f"{server.url}/metrics").text
        info = [line for line in text.splitlines() if line.startswith("quantserve_forward_path_info{")]
        assert len(info) == 1 and f'forward="{forward}"' in info[0] and f'attention_backend="{attention}"' in info[0]
        assert parse_metrics(text)["quantserve_engine_steps_total"] > 0


def test_a_path_that_cannot_serve_is_refused_at_start():
    """The fused step calls the native attention kernel: with the torch backend it cannot run, and
    the server says so and exits non-zero instead of quietly serving another path."""
    done = run_serve("--forward", "fused", "--attention-backend", "torch", "--kv-cache-memory", "0.25",
                     "--port", "0")
    assert done.returncode != 0
    assert "forward 'fused' cannot serve" in done.stdout + done.stderr
    assert "attention backend is torch" in done.stdout + done.stderr
