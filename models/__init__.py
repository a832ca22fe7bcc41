"""lipcert models: PyTorch sandwich (LBDN) layers, baselines, training and export to the sdp IR.

Public surface (one name per line)::

    SandwichLinear, SandwichOutput   sandwich layers (models.sandwich)
    SandwichConv2d                   circular-conv sandwich layer, per frequency (models.conv)
    ConvLBDN, save_conv_lbdn, load_conv_lbdn, conv_lbdn_to_bytes   conv LBDN (models.conv_lbdn)
    LBDN                             Lipschitz-bounded MLP with bound gamma (models.lbdn)
    save_lbdn, load_lbdn, load_network, lbdn_to_bytes, convert_lbdn_jl   files (models.io)
    plain_mlp, spectral_mlp, orthogonal_mlp, OrthogonalLinear           baselines
    empirical_lipschitz              gradient-ascent lower bound (models.empirical)
    TorchNetwork                     run an sdp IR network with torch (models.runtime)
"""

from models.baselines import OrthogonalLinear, orthogonal_mlp, plain_mlp, spectral_mlp
from models.conv import SandwichConv2d
from models.conv_lbdn import ConvLBDN, conv_lbdn_to_bytes, load_conv_lbdn, save_conv_lbdn
from models.empirical import empirical_lipschitz
from models.io import convert_lbdn_jl, lbdn_to_bytes, load_lbdn, load_network, save_lbdn
from models.lbdn import LBDN
from models.runtime import TorchNetwork
from models.sandwich import SandwichLinear, SandwichOutput

__all__ = [
    "LBDN",
    "ConvLBDN",
    "OrthogonalLinear",
    "SandwichConv2d",
    "SandwichLinear",
    "SandwichOutput",
    "TorchNetwork",
    "conv_lbdn_to_bytes",
    "convert_lbdn_jl",
    "empirical_lipschitz",
    "lbdn_to_bytes",
    "load_conv_lbdn",
    "load_lbdn",
    "load_network",
    "orthogonal_mlp",
    "plain_mlp",
    "save_conv_lbdn",
    "save_lbdn",
    "spectral_mlp",
]
