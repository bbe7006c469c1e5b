"""The precisions a model loads at, by name (torch-free, so the CLI's parser can list them without importing
torch). A quantized precision keeps its Linears' weights in int8 or int4 (model/quantize.py) and computes
everything else in bfloat16."""

from __future__ import annotations

from typing import Literal

QuantKind = Literal["int8", "int4"]
FLOAT_DTYPES = ("float32", "bfloat16")
# name -> (kind, input columns sharing a scale: the kernels' and GGUF's block of 32)
QUANT_DTYPES: dict[str, tuple[QuantKind, int]] = {"int8": ("int8", 32), "int4": ("int4", 32)}
DTYPE_CHOICES = ["auto", *FLOAT_DTYPES, *QUANT_DTYPES]
DTYPE_HELP = ("precision: float32, bfloat16, or int8 / int4 weights; auto picks what benchmarks/decode.py and "
              "benchmarks/quality.py measured fastest at fp32's quality")
