"""Sandwich (LBDN) networks in numpy: their raw parameters, maths and file format.

- :mod:`sdp.sandwich.dense`: dense sandwich layers, the Cayley transform, the equivalent plain
  network and the sandwich forward pass;
- :mod:`sdp.sandwich.conv`: convolutional sandwich layers (per-frequency Cayley transform);
- :mod:`sdp.sandwich.config`: the lipcert/1 "sandwich" safetensors config (untrusted input),
  dense and conv, with :func:`network_from_safetensors` as the front door.

The closed-form certificate check (bound method "sandwich") is a bound method like the others:
:func:`sdp.bounds.sandwich.sandwich_bound` (design.md §3.4).
"""

from sdp.sandwich.config import (
    CONFIG_FORMAT,
    config_json,
    conv_params_from_safetensors,
    is_conv_config,
    network_from_safetensors,
    params_from_safetensors,
    params_to_safetensors,
)
from sdp.sandwich.conv import ConvSandwichLayer, ConvSandwichParams, conv_forward
from sdp.sandwich.dense import (
    SandwichLayer,
    SandwichParams,
    cayley,
    plain_network,
    plain_weights,
    sandwich_forward,
)

__all__ = [
    "CONFIG_FORMAT",
    "ConvSandwichLayer",
    "ConvSandwichParams",
    "SandwichLayer",
    "SandwichParams",
    "cayley",
    "config_json",
    "conv_forward",
    "conv_params_from_safetensors",
    "is_conv_config",
    "network_from_safetensors",
    "params_from_safetensors",
    "params_to_safetensors",
    "plain_network",
    "plain_weights",
    "sandwich_forward",
]
