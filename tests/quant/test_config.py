"""QuantConfig: BitsAndBytesConfig's fields and meanings, validated, round-tripping."""

from __future__ import annotations

import pytest
import torch

from quantserve.quant import QuantConfig


def test_round_trips_through_transformers_dict():
    from transformers import BitsAndBytesConfig

    theirs = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
        llm_int8_skip_modules=["lm_head", "mlp.gate"],
    )
    ours = QuantConfig.from_dict(theirs.to_dict())
    assert ours.bnb_4bit_quant_type == "nf4" and ours.bnb_4bit_use_double_quant
    assert ours.bnb_4bit_compute_dtype == torch.bfloat16 and ours.bnb_4bit_quant_storage == torch.bfloat16
    assert ours.llm_int8_skip_modules == ("lm_head", "mlp.gate")
    assert ours.to_dict() == theirs.to_dict()
    back = BitsAndBytesConfig.from_dict(ours.to_dict())
    assert back.to_dict() == theirs.to_dict()
    assert QuantConfig.from_dict(ours.to_dict()) == ours
    assert QuantConfig.from_bnb_config(theirs) == ours


def test_missing_quant_type_means_what_transformers_means():
    from transformers import BitsAndBytesConfig

    d = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    assert QuantConfig.from_dict(d).bnb_4bit_quant_type == BitsAndBytesConfig.from_dict(d).bnb_4bit_quant_type


def test_defaults():
    c = QuantConfig()
    assert c.bnb_4bit_quant_type == "nf4" and c.blocksize == 64 and c.bnb_4bit_compute_dtype is None
    assert QuantConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"bnb_4bit_quant_type": "int4"}, ValueError, "bnb_4bit_quant_type"),
        ({"bnb_4bit_compute_dtype": "float64"}, ValueError, "bnb_4bit_compute_dtype"),
        ({"bnb_4bit_compute_dtype": torch.int8}, ValueError, "bnb_4bit_compute_dtype"),
        ({"bnb_4bit_quant_storage": "complex64"}, ValueError, "bnb_4bit_quant_storage"),
        ({"blocksize": 48}, ValueError, "blocksize"),
        ({"blocksize": 8192}, ValueError, "blocksize"),
        ({"load_in_4bit": True, "load_in_8bit": True}, ValueError, "load_in_8bit"),
        ({"load_in_4bit": False}, ValueError, "load_in_4bit"),
        ({"bnb_4bit_use_double_quant": "yes"}, TypeError, "bnb_4bit_use_double_quant"),
        ({"llm_int8_skip_modules": "lm_head"}, TypeError, "llm_int8_skip_modules"),
    ],
)
def test_invalid(kwargs, error, match):
    with pytest.raises(error, match=match):
        QuantConfig(**kwargs)


def test_unknown_and_foreign_keys_rejected():
    with pytest.raises(ValueError, match="bnb_4bit_quant_tpye"):
        QuantConfig.from_dict({"quant_method": "bitsandbytes", "bnb_4bit_quant_tpye": "nf4"})
    with pytest.raises(ValueError, match="quant_method"):
        QuantConfig.from_dict({"quant_method": "gptq"})
