"""Which models a server knows (server/loading/catalog.py): MODEL arguments, --models-dir,
--models-config, each with the settings it loads with; and the keep-alive durations."""

from __future__ import annotations

import pytest

from quantserve.server.config import Settings, parse_duration
from quantserve.server.loading.catalog import build_catalog, split_entry


def test_split_entry():
    assert split_entry("chat=/models/a") == ("chat", "/models/a")
    assert split_entry("HuggingFaceTB/SmolLM2-135M-Instruct") == (None, "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert split_entry("/data/x=y/model") == (None, "/data/x=y/model")  # a path with "=" in it
    assert split_entry("=/models/a") == (None, "=/models/a")


def test_no_model_is_the_default_one_model_server():
    catalog = build_catalog(Settings())
    (spec,) = catalog.specs
    assert catalog.single and spec.preload and spec.settings.model is None
    assert spec.name == "SmolLM2-135M-Instruct" and spec.keep_alive is None  # never expires


def test_model_arguments(tmp_path):
    catalog = build_catalog(Settings(models=["chat=/m/a", "org/coder"], quant="fp4"))
    assert not catalog.single
    assert [(s.name, s.settings.model, s.settings.served_model_name, s.settings.quant) for s in catalog.specs] == [
        ("chat", "/m/a", "chat", "fp4"), ("org/coder", "org/coder", "org/coder", "fp4")]
    assert all(s.preload and s.keep_alive is None for s in catalog.specs)
    one = build_catalog(Settings(models=["/m/a"], served_model_name="mine"))
    assert one.single and one.specs[0].name == "mine"
    # --keep-alive given: the startup models expire too
    assert build_catalog(Settings(models=["a=/m/a", "b=/m/b"], keep_alive="10m")).specs[0].keep_alive == 600
    with pytest.raises(ValueError, match="two models are named 'a'"):
        build_catalog(Settings(models=["a=/m/a", "a=/m/b"]))


def test_models_dir(tmp_path):
    (tmp_path / "hf-model").mkdir()
    (tmp_path / "hf-model" / "config.json").write_text("{}")
    (tmp_path / "qwen.Q4_0.gguf").write_bytes(b"GGUF")
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / ".hidden.gguf").write_bytes(b"GGUF")
    catalog = build_catalog(Settings(models_dir=str(tmp_path), keep_alive=30))
    assert not catalog.single
    assert {s.name: (s.settings.model, s.preload, s.keep_alive) for s in catalog.specs} == {
        "hf-model": (str(tmp_path / "hf-model"), False, 30.0),
        "qwen.Q4_0": (str(tmp_path / "qwen.Q4_0.gguf"), False, 30.0)}
    with pytest.raises(ValueError, match="no such folder"):
        build_catalog(Settings(models_dir=str(tmp_path / "missing")))


@pytest.mark.parametrize("suffix", ["yaml", "toml"])
def test_models_config(tmp_path, suffix):
    (tmp_path / "models" / "coder").mkdir(parents=True)
    (tmp_path / "models" / "coder" / "config.json").write_text("{}")
    text = {
        "yaml": "coder:\n  quant: fp4\n  max-model-len: 4096\n  keep_alive: 1h\n"
                "tiny:\n  model: /m/tiny\n  preload: true\n  lora_modules: [sql=/a/sql]\n",
        "toml": "[coder]\nquant = \"fp4\"\nmax-model-len = 4096\nkeep_alive = \"1h\"\n"
                "[tiny]\nmodel = \"/m/tiny\"\npreload = true\nlora_modules = [\"sql=/a/sql\"]\n",
    }[suffix]
    config = tmp_path / f"models.{suffix}"
    config.write_text(text)
    catalog = build_catalog(Settings(models_dir=str(tmp_path / "models"), models_config=str(config)))
    specs = {s.name: s for s in catalog.specs}
    coder, tiny = specs["coder"], specs["tiny"]
    assert (coder.settings.quant, coder.settings.max_model_len, coder.keep_alive, coder.preload) == (
        "fp4", 4096, 3600.0, False)
    assert coder.settings.model == str(tmp_path / "models" / "coder")
    assert (tiny.settings.model, tiny.preload, tiny.settings.lora_pairs()) == ("/m/tiny", True, [("sql", "/a/sql")])
    assert tiny.settings.quant == "nf4"  # not set: the flag's default


@pytest.mark.parametrize("text, match", [
    ("x:\n  model: /m/x\n  port: 9000\n", "port belong to the server"),
    ("x:\n  model: /m/x\n  quantisation: nf4\n", "unknown settings quantisation"),
    ("x:\n  model: /m/x\n  quant: int3\n", "model 'x'.*quant"),
    ("x:\n  quant: fp4\n", "names no model"),
    ("- a\n- b\n", "mapping of model names"),
    ("x: [unclosed\n", "models-config"),
])
def test_models_config_errors(tmp_path, text, match):
    config = tmp_path / "models.yaml"
    config.write_text(text)
    with pytest.raises(ValueError, match=match):
        build_catalog(Settings(models_config=str(config)))


def test_durations():
    assert [parse_duration(v) for v in ("5m", "1h30m", "90s", "250ms", "-1", "0", 12, " 2.5 ")] == [
        300.0, 5400.0, 90.0, 0.25, -1.0, 0.0, 12, 2.5]
    assert parse_duration("-5m") == -300.0
    for bad in ("5 minutes", "m", "1d", ""):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)
    assert Settings(keep_alive="2m").keep_alive == 120.0


def test_speculation_is_set_per_model(tmp_path):
    """The flag's speculative config is every model's default; a models-config entry sets its own
    or none (a draft model must share its target's tokenizer)."""
    config = tmp_path / "models.yaml"
    config.write_text("a:\n  model: /m/a\n  speculative_config: {method: ngram, num_speculative_tokens: 4}\n"
                      "b:\n  model: /m/b\n  speculative_config: null\nc:\n  model: /m/c\n")
    flag = '{"method": "ngram", "num_speculative_tokens": 2}'
    specs = {s.name: s.settings.speculative_config for s in
             build_catalog(Settings(models_config=str(config), speculative_config=flag)).specs}
    assert specs["a"].num_speculative_tokens == 4 and specs["b"] is None
    assert specs["c"].num_speculative_tokens == 2
