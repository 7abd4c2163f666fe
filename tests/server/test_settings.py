"""Settings: flags and QUANTSERVE_* variables reach the process as documented."""

from __future__ import annotations

import argparse

import pydantic
import pytest
import torch

from quantserve.server.config import Settings
from quantserve.server.serve import add_serve_arguments, settings_from_args


def test_matmul_precision_default_flag_and_env(monkeypatch):
    assert Settings().matmul_precision == "medium"
    monkeypatch.setenv("QUANTSERVE_MATMUL_PRECISION", "highest")
    assert Settings().matmul_precision == "highest"
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--matmul-precision", "medium"])
    assert settings_from_args(args).matmul_precision == "medium"  # the flag wins over the variable
    monkeypatch.setenv("QUANTSERVE_MATMUL_PRECISION", "fast")
    with pytest.raises(pydantic.ValidationError):
        Settings()


def test_serving_applies_the_precision(monkeypatch):
    """prepare_process sets torch's precision before any model loads (the CPU 4-bit matmul reads it)."""
    from quantserve.server.loading import loader
    from quantserve.quant.backends.cpu import bf16_products_allowed

    class Stop(Exception):
        pass

    def stop(settings):
        raise Stop(torch.get_float32_matmul_precision(), bf16_products_allowed())

    from quantserve.server import serve

    monkeypatch.setattr(loader, "load_for_serving", stop)
    try:
        for precision, bf16 in (("medium", True), ("highest", False)):
            with pytest.raises(Stop) as info:
                settings = Settings(matmul_precision=precision)
                serve.prepare_process(settings)
                serve.load_served_model(settings)
            assert info.value.args == (precision, bf16)
    finally:
        torch.set_float32_matmul_precision("highest")


@pytest.mark.parametrize("quant", ["int8", "none"])
def test_double_quant_is_refused_outside_the_4bit_formats(quant):
    """--double-quant quantizes the 4-bit formats' absmax; with int8 or none it would be ignored."""
    with pytest.raises(pydantic.ValidationError, match="--double-quant applies to the 4-bit formats"):
        Settings(quant=quant, double_quant=True)
    assert Settings(quant="fp4", double_quant=True).double_quant


def test_list_settings_from_comma_separated_variables(monkeypatch):
    """QUANTSERVE_ALLOWED_HOSTS / QUANTSERVE_CORS_ORIGINS as a compose or Kubernetes file writes them
    (a,b), or as a JSON array; pydantic-settings alone would parse the first as JSON and fail."""
    monkeypatch.setenv("QUANTSERVE_ALLOWED_HOSTS", "quantserve, quantserve.default.svc")
    monkeypatch.setenv("QUANTSERVE_CORS_ORIGINS", '["https://a.example", "https://b.example"]')
    settings = Settings()
    assert settings.allowed_hosts == ["quantserve", "quantserve.default.svc"]
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
