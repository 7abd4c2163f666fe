"""Gemma 3 and Qwen 3 through a real `quantserve serve` process and the official openai client:
greedy completions equal transformers' generate on the model the server loads (the same folder,
loaded and quantized in this process); a model without a chat template serves /v1/completions and
answers /v1/chat/completions with a 400 naming the missing template; --chat-template supplies one."""

from __future__ import annotations

import signal

import openai
import pytest
import torch

from quantserve.server.loading.loader import LoadConfig, load_model

from .engine import family_models as fm
from .serving import run_serve, start_server

MAX_TOKENS = 12
QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]
# A plain template of our own (not the tokenizer's ChatML): a model served with it renders this.
TEMPLATE = "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}<<assistant>>"


def _save(family: str, folder, tokenizer, with_template: bool):
    import transformers

    cls_name, values = fm.FAMILIES[family]
    # The tokenizer's vocabulary (the server checks prompt ids against the model's), narrow layers.
    values = {**fm.COMMON, **values, "vocab_size": len(tokenizer), "hidden_size": 64}
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**values))
    model.save_pretrained(folder)
    template = tokenizer.chat_template
    if not with_template:
        tokenizer.chat_template = None
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.chat_template = template
    return folder


@pytest.fixture(scope="module")
def servers(default_model_dir, tmp_path_factory):
    """Two servers on tiny random models: qwen3 given a template with --chat-template (replacing
    its tokenizer's ChatML), and gemma3 with no template at all. One OpenMP thread each (tiny
    models; CPU-heavy neighbours make spinning threads wait for each other)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    root = tmp_path_factory.mktemp("families")
    folders = {"qwen3": _save("qwen3", root / "qwen3", tokenizer, True),
               "gemma3": _save("gemma3", root / "gemma3", tokenizer, False)}  # saved without a template
    (root / "template.jinja").write_text(TEMPLATE)
    # float32 products, as this process's oracle computes (the server's default is bf16 products),
    # and a float32 KV cache, as transformers' (a CPU server's default is bfloat16)
    flags = ("--matmul-precision", "highest", "--kv-cache-dtype", "float32")
    one_thread = {"OMP_NUM_THREADS": "1"}
    started = {
        "qwen3": start_server(str(folders["qwen3"]), "--served-model-name", "qwen3", *flags,
                              "--chat-template", str(root / "template.jinja"), env=one_thread),
        "gemma3": start_server(str(folders["gemma3"]), "--served-model-name", "gemma3", *flags, env=one_thread),
    }
    try:
        for server in started.values():
            server.wait_ready()
        yield started, folders, tokenizer
    finally:
        for server in started.values():
            server.send_signal(signal.SIGTERM)  # all at once: each drains and exits in parallel
        for server in started.values():
            server.stop()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread here too (see the servers fixture)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_models: dict = {}


def _oracle(folder, prompt: list[int]) -> list[int]:
    """transformers' greedy continuation on the model as the server loads it (same folder, same
    deterministic quantization and 16-bit head)."""
    if folder not in _models:
        _models[folder] = load_model(LoadConfig(str(folder), progress=False)).model
    model = _models[folder]
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def _completion_text(server, model: str, prompt) -> str:
    res = server.client().completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                             extra_body={"ignore_eos": True})
    assert res.usage.completion_tokens == MAX_TOKENS
    return res.choices[0].text


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_completions_equal_transformers(servers, family):
    started, folders, tokenizer = servers
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, len(tokenizer), (n,), generator=g).tolist() for n in (5, 40)]  # 40: past the window
    prompts.append(tokenizer.encode("The lighthouse keeper climbed the spiral stairs every evening at dusk"))
    for prompt in prompts:
        want = tokenizer.decode(_oracle(folders[family], prompt), skip_special_tokens=True)
        assert _completion_text(started[family], family, prompt) == want


def test_no_chat_template_is_a_400_naming_it(servers):
    started, _, _ = servers
    with pytest.raises(openai.BadRequestError) as err:
        started["gemma3"].client().chat.completions.create(model="gemma3", messages=QUESTION, max_tokens=4)
    body = err.value.body
    assert body["param"] == "messages" and "no chat template" in body["message"] and "--chat-template" in body["message"]
    assert err.value.response.json()["error"]["type"] == "invalid_request_error"
    assert _completion_text(started["gemma3"], "gemma3", "Hello")  # completions still served


def test_chat_template_flag_supplies_the_template(servers):
    """qwen3's server renders chats with the --chat-template file, not its tokenizer's ChatML, and
    the reply equals transformers' generate on that rendering."""
    started, folders, tokenizer = servers
    res = started["qwen3"].client().chat.completions.create(
        model="qwen3", messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    prompt = tokenizer.encode(f"<<user>> {QUESTION[0]['content']}\n<<assistant>>", add_special_tokens=False)
    assert res.choices[0].message.content == tokenizer.decode(_oracle(folders["qwen3"], prompt), skip_special_tokens=True)


def test_missing_chat_template_file_refused_at_startup(tmp_path):
    proc = run_serve("--chat-template", str(tmp_path / "nope.jinja"), timeout=120)
    assert proc.returncode == 2
    assert "--chat-template" in proc.stderr and "no chat template file" in proc.stderr
