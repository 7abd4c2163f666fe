"""The output head alone on the default model's shape (49152 x 576), 1 and 16 rows: the 16-bit head
(sixteen_bit.head_logits), --quantize-lm-head int8 and nf4 (quantized_head.py), at torch's "medium"
float32 matmul precision (the server's default). Mean of 50 calls after 5 warm-up calls.

    python bench/lm_head.py
"""

from __future__ import annotations

import time

import torch

from quantserve.server.engine.models.quantized_head import Int8Head, NF4Head
from quantserve.server.engine.models.sixteen_bit import head_logits


def main() -> None:
    from lock import hold  # bench/lock.py: one benchmark at a time on this machine
    hold()
    torch.set_float32_matmul_precision("medium")
    V, K = 49152, 576
    w = torch.randn(V, K).to(torch.bfloat16)
    int8, nf4 = Int8Head.from_weight(w, None), NF4Head.from_weight(w, None)
    for T in (1, 16):
        x = torch.randn(T, K)
        for name, f in [("bf16", lambda: head_logits(x, w)), ("int8", lambda: int8(x)), ("nf4", lambda: nf4(x))]:
            for _ in range(5):
                f()
            n = 50
            start = time.perf_counter()
            for _ in range(n):
                f()
            print(f"{T:>2} rows  {name:<5} {(time.perf_counter() - start) / n * 1e3:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
