"""QLoRA on CPU: fine-tune LoRA adapters on a frozen NF4 model and save them in peft's format.

    python examples/qlora.py                         # the built-in SmolLM2-135M-Instruct, 200 steps
    python examples/qlora.py --steps 30 --out /tmp/facts-adapter --rank 8 --lr 5e-4
    quantserve serve --lora-modules facts=/tmp/facts-adapter   # serve it (the serving half of issue 16)

The base model is loaded with transformers and quantized with quantserve.quant (NF4, double
quantization, float32 compute); every Linear but the output head becomes a frozen 4-bit layer.
peft wraps them with LoRA through quant.peft; the loss is taken on the answer tokens only, with
the model's chat template around each pair, as the model will be prompted when served. The saved
folder (adapter_config.json + adapter_model.safetensors) loads with peft on transformers +
bitsandbytes too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).with_name("data") / "qlora_facts.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="base model: a folder, a .gguf file or a Hub id "
                             "(default: the built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="JSON lines with 'instruction' and 'answer' "
                             "(default: the shipped examples/data/qlora_facts.jsonl)")
    parser.add_argument("--out", type=Path, default=Path("qlora-adapter"), help="where the adapter is saved")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (linear warm-up, then cosine decay)")
    parser.add_argument("--target-modules", default="all-linear",
                        help="comma-separated module names, or 'all-linear' (every 4-bit Linear)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in backward (less memory, ~30%% slower)")
    parser.add_argument("--matmul-precision", choices=("highest", "high", "medium"), default="medium",
                        help="torch's float32 matmul precision: 'medium' (the server's default) lets float32 "
                             "matmuls, the 4-bit ones included, use bf16 products with float32 sums, about twice "
                             "as fast on CPUs with AVX-512-BF16 / AMX; 'highest' keeps full float32")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice, one per core); 1 is faster when "
                             "other work is busy on the same cores")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    for name in ("steps", "batch_size", "rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.lr > 0:
        parser.error("--lr must be positive")
    if not args.data.is_file():
        parser.error(f"--data {args.data} does not exist")
    return args


def load_pairs(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not (isinstance(row, dict) and isinstance(row.get("instruction"), str)
                and isinstance(row.get("answer"), str)):
            raise ValueError(f"{path}:{number}: expected an object with string 'instruction' and 'answer'")
        pairs.append((row["instruction"], row["answer"]))
    if not pairs:
        raise ValueError(f"{path} holds no pairs")
    return pairs


def encode(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per pair: the chat-templated conversation, labels -100 on the prompt so
    the loss counts only the answer and the end-of-turn token."""
    examples = []
    for question, answer in pairs:
        user = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tokenizer.apply_chat_template(
            user + [{"role": "assistant", "content": answer}], tokenize=True, return_dict=False
        )
        if full[: len(prompt)] != prompt:
            raise ValueError("the chat template renders the prompt differently inside the full conversation")
        examples.append((full, [-100] * len(prompt) + full[len(prompt):]))
    return examples


def collate(batch, pad_id: int):
    """Left-padded (input_ids, labels, attention_mask, position_ids): every answer ends at the last
    column, so the output head only needs the last few positions (see answer_loss)."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(batch):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        labels[row, width - len(labs):] = torch.tensor(labs)
        attention_mask[row, width - len(ids):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # positions start at each row's first token
    return input_ids, labels, attention_mask, position_ids


def answer_loss(model, input_ids, labels, attention_mask, position_ids):
    """Mean cross-entropy over the answer tokens (transformers' causal-LM loss on these labels),
    with the output head applied only to the last positions that predict them: the head
    (49152 x 576 for the default model) would otherwise cost a fifth of the forward and backward."""
    import torch

    labelled = (labels != -100).any(0).nonzero()
    keep = labels.shape[1] - int(labelled[0]) + 1  # positions from the one before the first label
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=keep).logits
    targets = labels[:, -keep + 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def load_base(model: str | None):
    """(float32 transformers model with quant NF4 layers, tokenizer, the base's name for the adapter)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import quantserve.quant as quant
    from quantserve.kernels.cache import cache_root
    from quantserve.server.loading.sources import resolve_source

    folder, _description = resolve_source(model, None, cache_root())
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = quant.QuantConfig(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    report = quant.quantize_model(base, config)
    print(report.__str__().splitlines()[0], flush=True)
    # peft records the base as given: a Hub id stays an id; a local model (the built-in one
    # included) is named by the folder its weights were loaded from, which peft and transformers load.
    name = model if model is not None and not os.path.exists(model) else str(Path(folder).resolve())
    return base, tokenizer, name


def lr_at(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def train(args: argparse.Namespace) -> dict:
    import torch
    from peft import LoraConfig
    from tqdm.auto import tqdm

    from quantserve.quant.peft import get_peft_model
    from quantserve.quant.training import prepare_model_for_kbit_training

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_float32_matmul_precision(args.matmul_precision)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base, tokenizer, base_name = load_base(args.model)
    examples = encode(tokenizer, load_pairs(args.data))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    prepare_model_for_kbit_training(
        base, use_gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha or 2 * args.rank, lora_dropout=0.0,
                      target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{len(examples)} pairs; LoRA r={args.rank} on {args.target_modules}: {trainable:,} trainable parameters",
          flush=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)

    model.train()
    order: list[int] = []
    losses: list[float] = []
    bar = tqdm(range(args.steps), desc="training", unit="step", file=sys.stdout, mininterval=1.0)
    for step in bar:
        if len(order) < args.batch_size:
            fresh = list(range(len(examples)))
            random.shuffle(fresh)
            order += fresh
        batch = [examples[i] for i in order[: args.batch_size]]
        del order[: args.batch_size]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        loss = answer_loss(model, *collate(batch, pad_id))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if (step + 1) % max(1, args.steps // 10) == 0 or step + 1 == args.steps:
            recent = losses[-max(1, args.steps // 10):]
            tqdm.write(f"step {step + 1:>4}/{args.steps}  loss {sum(recent) / len(recent):.3f}", file=sys.stdout)
    bar.close()
    train_seconds = time.perf_counter() - started

    model.peft_config["default"].base_model_name_or_path = base_name
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    window = max(1, min(10, args.steps // 4))
    summary = {
        "steps": args.steps, "batch_size": args.batch_size, "rank": args.rank, "lr": args.lr,
        "first_loss": sum(losses[:window]) / window, "last_loss": sum(losses[-window:]) / window,
        "window": window, "losses": losses, "seconds": round(train_seconds, 1), "base_model": base_name,
    }
    (args.out / "training_loss.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"loss {summary['first_loss']:.3f} (first {window} steps) -> {summary['last_loss']:.3f} (last {window}); "
          f"{train_seconds:.0f} s in all; adapter saved to {args.out}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
