"""Weight-only quantization at load: wint8 (per-channel int8) and wint4 (group-wise int4).

`quantize_model(layers, "wint8" | "wint4", group_size=128)` swaps the linears and expert
stacks of a module tree for quantized stand-ins (`engine.models.load_model(...,
quantization=...)` applies it to the language model's decoder layers once the weights are
loaded). Numerics: symmetric round-to-nearest, so each weight is off by at most half its
scale; each forward dequantizes `q * s` to the activation dtype (one rounding) and runs the
float GEMM / fused MoE with fp32 accumulation, as the unquantized model does.
"""

from engine.quantization.layers import QuantizedExperts, QuantizedLinear
from engine.quantization.transform import quantize_model
from engine.quantization.weights import (
    METHODS,
    QuantConfig,
    dequantize,
    pack_int4,
    quantize,
    unpack_int4,
)

__all__ = [
    "METHODS",
    "QuantConfig",
    "QuantizedExperts",
    "QuantizedLinear",
    "dequantize",
    "pack_int4",
    "quantize",
    "quantize_model",
    "unpack_int4",
]
