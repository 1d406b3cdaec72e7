"""Quantization-aware training (six methods) and conversion to a real INT8 model; docs/quantization.md."""
from rayrec.quant.prepare import (QuantLinear, init_from_float, is_quant_param, load_float_weights, prepare, quant_penalty,
                                  quantizers, set_fake_quant)

__all__ = ["QuantLinear", "init_from_float", "is_quant_param", "load_float_weights", "prepare", "quant_penalty", "quantizers",
           "set_fake_quant"]
