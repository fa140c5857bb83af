"""Quantized weights: the definition, the engines' and weight programs' ops, their kernels."""

from .definition import FORMATS, QUANTIZED_DTYPES, SCALE_SUFFIX, dequantize, format_of, reference
from .ops import OPS, QUANT_MM, QUANTIZE_WEIGHT, quant_mm, quantize_weight, reference_mm

__all__ = [
    "FORMATS",
    "OPS",
    "QUANTIZED_DTYPES",
    "QUANTIZE_WEIGHT",
    "QUANT_MM",
    "SCALE_SUFFIX",
    "dequantize",
    "format_of",
    "quant_mm",
    "quantize_weight",
    "reference",
    "reference_mm",
]
