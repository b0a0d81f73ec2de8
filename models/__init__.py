"""Quantized networks, their bit-level representation and the OCM output (docs/algorithms.md sections 1-3).

Knows nothing of data, training or attacks.
"""

from .bits import bit_values, bits_to_int, flip_bits, hamming_distance, int_to_bits
from .formats import (ChannelQuantConv2d, ChannelQuantLinear, DeployedModel, FormatConv2d,
                      FormatLinear, from_ao, plain_layers, quantize_per_channel,
                      to_float_format, write_back)
from .ocm import OutputCodeMatching, SoftmaxOutput, build_output, hadamard, make_codebook
from .quantization import (QuantConv2d, QuantLayer, QuantLinear, quant_layers,
                           to_float, to_integer)
from .registry import default_bits, get_model, get_model_entry, list_models, register_model

__all__ = [
    "bit_values", "bits_to_int", "flip_bits", "hamming_distance", "int_to_bits",
    "ChannelQuantConv2d", "ChannelQuantLinear", "DeployedModel", "FormatConv2d",
    "FormatLinear", "from_ao", "plain_layers", "quantize_per_channel", "to_float_format",
    "write_back",
    "OutputCodeMatching", "SoftmaxOutput", "build_output", "hadamard", "make_codebook",
    "QuantConv2d", "QuantLayer", "QuantLinear", "quant_layers", "to_float",
    "to_integer", "default_bits", "get_model", "get_model_entry", "list_models",
    "register_model",
]
