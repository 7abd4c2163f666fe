"""Fixtures shared by the server tests: LoRA adapters made by peft on the default model (one set
per session, so that peft's reference outputs, cached per adapter and prompt in lora_helpers,
are computed once for the engine and the real-server tests)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def lora_adapters(default_model_dir, tmp_path_factory):
    from .lora_helpers import ALL, ATTENTION, MLP, make_adapter

    root = tmp_path_factory.mktemp("lora-adapters")
    return {
        "attn": make_adapter(default_model_dir, root / "attn", ATTENTION, seed=1),
        "mlp": make_adapter(default_model_dir, root / "mlp", MLP, seed=2),
        "all": make_adapter(default_model_dir, root / "all", ALL, seed=3, r=4, alpha=8, use_rslora=True),
        "big": make_adapter(default_model_dir, root / "big", ALL, seed=4, r=16, alpha=16),
    }
