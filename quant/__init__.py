"""quant: bitsandbytes-compatible block-wise 4-bit quantization (NF4 / FP4) and LLM.int8.

Same bytes, same checkpoints as bitsandbytes 0.50; ops dispatched through torch.library to a
pure-PyTorch reference and native backends.

    import quantserve.quant as quant
    packed, state = quant.quantize_4bit(weight, quant_type="nf4")
    y = quant.matmul_4bit(x, packed, state)
    report = quant.quantize_model(model, quant.QuantConfig(bnb_4bit_use_double_quant=True))

    CB, SCB, outlier_cols = quant.int8_vectorwise_quant(weight)          # 8-bit rows, as bitsandbytes
    y = quant.int8_matmul(x, CB, SCB)                                    # x @ dequantized W.T, float activations
    y = quant.int8_matmul(x, CB, SCB, threshold=6.0, int8_activations=True)  # LLM.int8 decomposition (opt-in)
    report = quant.quantize_model(model, quant.QuantConfig(load_in_8bit=True))   # Linear8bitLt
"""

from .codebooks import get_4bit_code, get_dynamic_map
from .config import QuantConfig
from .convert import ConversionReport, quantize_model
from .functional import dequantize_4bit, dequantize_absmax, matmul_4bit, quantize_4bit
from .int8 import int8_matmul, int8_vectorwise_dequant, int8_vectorwise_quant
from .linear8bit import Int8Params, Linear8bitLt
from .nn import Linear4bit, Params4bit
from .state import NestedState, QuantState

__all__ = [
    "ConversionReport",
    "Int8Params",
    "Linear4bit",
    "Linear8bitLt",
    "NestedState",
    "Params4bit",
    "QuantConfig",
    "QuantState",
    "dequantize_4bit",
    "dequantize_absmax",
    "get_4bit_code",
    "get_dynamic_map",
    "int8_matmul",
    "int8_vectorwise_dequant",
    "int8_vectorwise_quant",
    "matmul_4bit",
    "quantize_4bit",
    "quantize_model",
]
