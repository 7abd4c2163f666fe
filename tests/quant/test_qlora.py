"""QLoRA with peft on quant's 4-bit layers, against peft on transformers + bitsandbytes NF4 (the
oracle: same folder, same packed bytes, peft's own bitsandbytes LoRA layer); and the example
(examples/qlora.py) run short on the built-in model.

Models in these tests stay in train() mode: in eval mode bitsandbytes' CPU Linear4bit repacks its
weight for an AVX-512 bf16 kernel (a different arithmetic); Llama has no dropout and the LoRA
dropout is 0, so train() changes nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantserve.quant as quant
from quantserve.quant.nn import Linear4bit

peft = pytest.importorskip("peft")
from quantserve.quant.peft import LoraLinear4bit, get_peft_model, load_adapter  # noqa: E402
from quantserve.quant.training import prepare_model_for_kbit_training  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_llama_folder(tmp_path: Path, dtype=torch.float32) -> Path:
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).to(dtype).save_pretrained(tmp_path)
    return tmp_path


def _ours(folder: Path, dtype=torch.float32, double_quant=False):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    quant.quantize_model(model, quant.QuantConfig(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                                  bnb_4bit_compute_dtype=torch.float32))
    return model.train()


def _theirs(folder: Path, dtype=torch.float32, double_quant=False):
    import transformers as tf

    config = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
    model = tf.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu", dtype=dtype)
    return model.train()


def _assert_same_bytes(ours, theirs, names):
    for name in names:
        assert torch.equal(ours.get_submodule(name).weight.data.view(torch.uint8),
                           theirs.get_submodule(name).weight.data.view(torch.uint8)), name


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_get_peft_model_wraps_linear4bit_and_matches_bitsandbytes(bnb, tmp_path):
    folder = _tiny_llama_folder(tmp_path / "base")
    ours = _ours(folder)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(1)  # init_lora_weights=False: A and B both random, so the adapter changes outputs
    ours = get_peft_model(ours, lora)
    wrapped = {n: m for n, m in ours.named_modules() if isinstance(m, LoraLinear4bit)}
    assert len(wrapped) == 14 and all(isinstance(m.base_layer, Linear4bit) for m in wrapped.values())
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ours.save_pretrained(tmp_path / "adapter")

    theirs = peft.PeftModel.from_pretrained(_theirs(folder), tmp_path / "adapter", is_trainable=True)
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
    _assert_same_bytes(ours.base_model.model, theirs.base_model.model,
                       [n.replace("base_model.model.", "") + ".base_layer" for n in wrapped])

    ids = torch.randint(0, 256, (2, 10))
    out, out_ref = ours(input_ids=ids, labels=ids), theirs(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, out_ref.logits, atol=1e-5, rtol=1e-5)
    with ours.disable_adapter():
        base_logits = ours(input_ids=ids).logits
    assert (base_logits - out.logits).abs().max() > 1e-2  # the adapter matters
    out.loss.backward()
    out_ref.loss.backward()
    grads, grads_ref = _lora_grads(ours), _lora_grads(theirs)
    assert grads.keys() == grads_ref.keys() and len(grads) == 28
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_prepare_and_checkpointing_match_peft_on_bitsandbytes(bnb, tmp_path, use_reentrant):
    # A bf16 checkpoint: prepare_model_for_kbit_training must lift the norms and embeddings to fp32,
    # as peft's own function does for a bitsandbytes model.
    folder = _tiny_llama_folder(tmp_path / "base", dtype=torch.bfloat16)
    kwargs = {"use_reentrant": use_reentrant}
    ours = prepare_model_for_kbit_training(_ours(folder, torch.bfloat16, double_quant=True),
                                           gradient_checkpointing_kwargs=kwargs)
    theirs = peft.prepare_model_for_kbit_training(_theirs(folder, torch.bfloat16, double_quant=True),
                                                  gradient_checkpointing_kwargs=kwargs)
    dtypes = {n: p.dtype for n, p in ours.named_parameters()}
    assert dtypes == {n: p.dtype for n, p in theirs.named_parameters()}
    assert dtypes["model.norm.weight"] == torch.float32 and dtypes["model.embed_tokens.weight"] == torch.float32
    assert ours.is_gradient_checkpointing and not any(p.requires_grad for p in ours.parameters())

    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(1)
    ours = get_peft_model(ours, lora)
    ours.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(theirs, tmp_path / "adapter", is_trainable=True)
    ids = torch.randint(0, 256, (2, 10))
    out, out_ref = ours(input_ids=ids, labels=ids), theirs(input_ids=ids, labels=ids)
    out.loss.backward()
    out_ref.loss.backward()
    # Double quantization: the bytes differ where bitsandbytes' CPU picks a coarser absmax code
    # (test_bnb_parity.py), so outputs agree to that rounding, not to the last bit.
    torch.testing.assert_close(out.logits, out_ref.logits, atol=2e-3, rtol=1e-3)
    grads, grads_ref = _lora_grads(ours), _lora_grads(theirs)
    assert len(grads) == 28 and all(g is not None for g in grads.values())
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-3, rtol=5e-2, msg=name)


def test_lora_trains_under_autocast_bf16(bnb, tmp_path):
    folder = _tiny_llama_folder(tmp_path / "base")
    torch.manual_seed(1)
    ours = get_peft_model(prepare_model_for_kbit_training(_ours(folder), use_gradient_checkpointing=False),
                          peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    ours.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(
        peft.prepare_model_for_kbit_training(_theirs(folder), use_gradient_checkpointing=False),
        tmp_path / "adapter", is_trainable=True,
    )
    ids = torch.randint(0, 256, (2, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_ref = ours(input_ids=ids, labels=ids), theirs(input_ids=ids, labels=ids)
    out.loss.backward()
    out_ref.loss.backward()
    # Identical operations in the same dtypes on both sides (4-bit matmuls in fp32, the rest bf16).
    torch.testing.assert_close(out.logits, out_ref.logits)
    grads, grads_ref = _lora_grads(ours), _lora_grads(theirs)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], msg=name)


def test_merge_requantizes_and_matches_bitsandbytes_merge(bnb, tmp_path):
    folder = _tiny_llama_folder(tmp_path / "base")
    torch.manual_seed(1)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    ours = get_peft_model(_ours(folder), lora)
    ours.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(_theirs(folder), tmp_path / "adapter").train()  # see the docstring
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        unmerged = ours(input_ids=ids).logits
        with pytest.warns(UserWarning, match="requantizes"):
            ours.merge_adapter()
        theirs.merge_adapter()
        merged, merged_ref = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.merged and layer.base_layer.weight.dtype == torch.uint8
    _assert_same_bytes(ours.base_model.model, theirs.base_model.model,
                       ["model.layers.0.self_attn.q_proj.base_layer", "model.layers.1.mlp.down_proj.base_layer"])
    torch.testing.assert_close(merged, merged_ref, atol=1e-5, rtol=1e-5)
    assert (merged - unmerged).abs().max() < 0.2 * (unmerged.abs().max())  # one more 4-bit rounding


def test_loading_a_non_lora_folder_is_refused(tmp_path):
    with pytest.raises(ValueError):
        load_adapter(torch.nn.Linear(2, 2), tmp_path)


# ---- the example on the built-in model ----


def _run_example(out: Path, steps: int, extra: list[str] = ()) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(REPO / "examples" / "qlora.py"), "--steps", str(steps), "--out", str(out), *extra]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loss" in proc.stdout and "adapter saved" in proc.stdout
    return json.loads((out / "training_loss.json").read_text())


def test_example_help():
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "qlora.py"), "--help"],
                          check=False, capture_output=True, text=True)
    assert proc.returncode == 0
    for flag in ("--steps", "--out", "--rank", "--lr", "--model", "--data"):
        assert flag in proc.stdout
    bad = subprocess.run([sys.executable, str(REPO / "examples" / "qlora.py"), "--steps", "0"],
                         check=False, capture_output=True, text=True)
    assert bad.returncode == 2 and "--steps must be at least 1" in bad.stderr


def test_shipped_dataset_is_well_formed():
    rows = [json.loads(line) for line in (REPO / "examples" / "data" / "qlora_facts.jsonl").read_text().splitlines()]
    assert 200 <= len(rows) <= 1000
    assert all(set(r) == {"instruction", "answer"} and r["instruction"] and r["answer"] for r in rows)
    assert len({r["instruction"] for r in rows}) == len(rows)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, default_model_dir):
    out = tmp_path_factory.mktemp("qlora") / "adapter"
    # One thread: the time stays predictable (~4 CPU-seconds a step) when other work shares the cores.
    return out, _run_example(out, steps=12, extra=["--lr", "1e-3", "--threads", "1"])


def test_example_loss_falls_and_saves_a_peft_adapter(short_run, default_model_dir):
    out, summary = short_run
    assert summary["last_loss"] < 0.75 * summary["first_loss"], summary
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert Path(config["base_model_name_or_path"]) == Path(default_model_dir).resolve()
    from safetensors.torch import load_file

    tensors = load_file(out / "adapter_model.safetensors")
    assert len(tensors) == 30 * 7 * 2 and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)


def test_example_adapter_equals_peft_on_transformers_bitsandbytes(bnb, short_run, default_model_dir):
    out, _ = short_run
    tok = __import__("transformers").AutoTokenizer.from_pretrained(default_model_dir)
    prompts = ["What is the capital of Peru?", "What is 7 times 8?"]
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    batch = tok(texts, return_tensors="pt", padding=True)

    ours = load_adapter(_ours(default_model_dir), out)
    theirs = peft.PeftModel.from_pretrained(_theirs(default_model_dir), out).train()  # see the docstring
    names = [n for n, m in ours.base_model.model.named_modules() if isinstance(m, Linear4bit)]
    assert len(names) == 210
    _assert_same_bytes(ours.base_model.model, theirs.base_model.model, names)
    with torch.no_grad():
        logits = ours(**batch).logits
        logits_ref = theirs(**batch).logits
        with ours.disable_adapter():
            base = ours(**batch).logits
    mask = batch["attention_mask"].bool()
    # Same bytes, same float32 arithmetic up to the matmul kernels' summation order, through 30
    # layers: logits (magnitude ~20) agree to ~1e-4; the adapter moves them by far more.
    diff = (logits - logits_ref)[mask].abs().max().item()
    assert diff < 2e-3, diff
    assert (logits - base)[mask].abs().max().item() > 50 * max(diff, 1e-4)


def _example_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("qlora_example", REPO / "examples" / "qlora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_answer_loss_equals_transformers_loss(tmp_path):
    # The example's loss (left padding, output head on the last positions only) against
    # transformers' own causal-LM loss on the same pairs, right-padded, with full logits.
    import transformers as tf

    example = _example_module()
    model = tf.AutoModelForCausalLM.from_pretrained(_tiny_llama_folder(tmp_path), dtype=torch.float64).train()
    examples = [([5, 6, 7, 8, 9, 10], [-100, -100, -100, 8, 9, 10]), ([11, 12, 13, 14], [-100, -100, 13, 14]),
                ([1, 2, 3, 4, 5, 6, 7, 8, 9], [-100] * 7 + [8, 9])]
    loss = example.answer_loss(model, *example.collate(examples, pad_id=0))
    width = 9
    ids = torch.tensor([e[0] + [0] * (width - len(e[0])) for e in examples])
    labels = torch.tensor([e[1] + [-100] * (width - len(e[1])) for e in examples])
    mask = torch.tensor([[1] * len(e[0]) + [0] * (width - len(e[0])) for e in examples])
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, ref, atol=0, rtol=1e-6)  # both take the loss in float32


@pytest.mark.slow
def test_full_example_learns_the_dataset(tmp_path, default_model_dir):
    # The example as the README runs it (200 steps); the adapter then answers training questions
    # with the dataset's exact sentences, greedy, through transformers' generate on our 4-bit model.
    out = tmp_path / "adapter"
    summary = _run_example(out, steps=200)
    assert summary["last_loss"] < 0.5 * summary["first_loss"], summary
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(default_model_dir)
    model = load_adapter(_ours(default_model_dir).eval(), out)
    rows = [json.loads(line) for line in (REPO / "examples" / "data" / "qlora_facts.jsonl").read_text().splitlines()]
    right = 0
    for row in rows[:10]:
        ids = tok.apply_chat_template([{"role": "user", "content": row["instruction"]}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=24, do_sample=False)
        right += tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip() == row["answer"]
    assert right >= 8, right


def test_dora_is_refused(tmp_path):
    model = _ours(_tiny_llama_folder(tmp_path))
    with pytest.raises(ValueError, match="unsupported variant"):
        get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
