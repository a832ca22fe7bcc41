"""LBDN files: ``.safetensors`` with raw parameters and the lipcert/1 config (metadata "lipcert").

Loading never executes code: safetensors holds only arrays and a JSON header, and the config
is validated by :func:`sdp.sandwich.config.params_from_safetensors` before anything is built.
Also converts the RobustNeuralNetworks.jl MNIST LBDN fixture (``lbdn_mnist_params.npz``) into
the same format.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as np_save
from torch import nn

from models.lbdn import LBDN
from models.sandwich import SandwichLinear
from sdp.errors import ModelRejected
from sdp.ir import Network
from sdp.sandwich.config import config_json, network_from_safetensors, params_from_safetensors

METADATA_KEY = "lipcert"

_TORCH_ACTIVATIONS: dict[str, Any] = {
    "relu": lambda p: nn.ReLU(),
    "tanh": lambda p: nn.Tanh(),
    "sigmoid": lambda p: nn.Sigmoid(),
    "identity": lambda p: nn.Identity(),
    "leaky_relu": lambda p: nn.LeakyReLU(p),
    "elu": lambda p: nn.ELU(p),
    "softplus": lambda p: nn.Softplus(),
}


def layer_tensor_names(prefix: str, layer: nn.Module, *, hidden: bool) -> dict[str, str]:
    """Config "tensors" entry of a sandwich layer: state_dict keys of XY, d (hidden), b, alpha."""
    ts = {"XY": prefix + "XY"}
    if hidden:
        ts["d"] = prefix + "d"
    if layer.bias is not None:
        ts["b"] = prefix + "bias"
    if layer.alpha is not None:
        ts["alpha"] = prefix + "alpha"
    return ts


def hidden_layer_spec(prefix: str, layer: nn.Module) -> dict[str, Any]:
    """Config entry of a hidden SandwichLinear whose state_dict keys start with ``prefix``."""
    assert isinstance(layer, SandwichLinear)
    return {
        "type": "sandwich",
        "in": layer.in_features,
        "out": layer.out_features,
        "activation": layer.act_spec.name,
        "activation_param": layer.act_spec.param,
        "tensors": layer_tensor_names(prefix, layer, hidden=True),
    }


def sandwich_file_config(
    model: nn.Module, hidden_specs: list[dict[str, Any]], claimed_gamma: float | None
) -> dict[str, Any]:
    """The lipcert/1 "sandwich" config: ``hidden_specs``, then the spec of ``model.output``."""
    m: Any = model  # an LBDN or ConvLBDN (output, gamma, input_shape)
    o = m.output
    output_spec = {
        "type": "sandwich_output",
        "in": o.in_features,
        "out": o.out_features,
        "tensors": layer_tensor_names("output.", o, hidden=False),
    }
    return {
        "format": "lipcert/1",
        "kind": "sandwich",
        "gamma": m.gamma if claimed_gamma is None else claimed_gamma,
        "input_shape": list(m.input_shape),
        "tensors": {"log_gamma": "log_gamma"},
        "layers": [*hidden_specs, output_spec],
    }


def module_to_safetensors(model: nn.Module, config: Mapping[str, Any]) -> bytes:
    """safetensors bytes of ``model.state_dict()`` (as stored) with ``config`` as metadata."""
    tensors = {k: v.detach().cpu().contiguous().numpy() for k, v in model.state_dict().items()}
    return np_save(tensors, metadata={METADATA_KEY: config_json(config)})


def state_from_layer_specs(
    tensors: Mapping[str, np.ndarray], specs: list[dict[str, Any]], prefixes: list[str]
) -> dict[str, torch.Tensor]:
    """State dict entries named ``prefix + key`` ("b" -> "bias", alpha flattened) per layer spec."""
    state: dict[str, torch.Tensor] = {}
    for spec, pre in zip(specs, prefixes, strict=True):
        for key, src in spec["tensors"].items():
            arr = np.asarray(tensors[src])
            state[pre + ("bias" if key == "b" else key)] = torch.as_tensor(
                arr.reshape(-1) if key == "alpha" else arr
            )
    return state


def lbdn_config(model: LBDN, claimed_gamma: float | None = None) -> dict[str, Any]:
    """The lipcert/1 "sandwich" config of ``model``; tensor names are its state_dict keys."""
    specs = [hidden_layer_spec(f"hidden.{i}.", layer) for i, layer in enumerate(model.hidden)]
    return sandwich_file_config(model, specs, claimed_gamma)


def lbdn_to_bytes(model: LBDN, claimed_gamma: float | None = None) -> bytes:
    """Serialise ``model`` (raw parameters as stored, e.g. float32) to safetensors bytes."""
    return module_to_safetensors(model, lbdn_config(model, claimed_gamma))


def save_lbdn(model: LBDN, path: str | Path, claimed_gamma: float | None = None) -> None:
    Path(path).write_bytes(lbdn_to_bytes(model, claimed_gamma))


def read_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, config) of a lipcert safetensors file (no code is executed)."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise ModelRejected(f"not a readable safetensors file: {e}", code="invalid-file") from e
    if METADATA_KEY not in meta:
        raise ModelRejected("safetensors file has no 'lipcert' metadata", code="missing-config")
    try:
        config = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ModelRejected(f"lipcert metadata is not JSON: {e}", code="invalid-config") from e
    return tensors, config


def load_network(path: str | Path) -> Network:
    """The sdp IR network (with sandwich params) of an LBDN file."""
    tensors, config = read_safetensors(path)
    return network_from_safetensors(tensors, config)


def lbdn_from_tensors(
    tensors: Mapping[str, np.ndarray], config: Mapping[str, Any], dtype: torch.dtype | None = None
) -> LBDN:
    """Build an :class:`LBDN` from a validated config and load its tensors."""
    params = params_from_safetensors(tensors, config)  # validates shapes and values
    acts = {(la.activation.name, la.activation.param) for la in params.hidden if la.activation}
    if len(acts) > 1:
        raise ModelRejected("LBDN modules need one hidden activation", code="unsupported-kind")
    name, param = acts.pop() if acts else ("relu", 0.0)
    specs = config["layers"]
    normalize = {"alpha" in s["tensors"] for s in specs}
    if len(normalize) > 1:
        raise ModelRejected(
            "LBDN modules need alpha on every layer or none", code="unsupported-kind"
        )
    widths = [la.out_features for la in params.hidden]
    model = LBDN(
        params.layers[0].in_features,
        widths,
        params.output.out_features,
        gamma=params.gamma,
        activation=lambda: _TORCH_ACTIVATIONS[name](param),
        normalize=normalize.pop(),
        input_shape=params.input_shape,
        dtype=dtype,
    )
    targets = [f"hidden.{i}." for i in range(len(widths))] + ["output."]
    state = state_from_layer_specs(tensors, specs, targets)
    state["log_gamma"] = torch.tensor([math.log(params.gamma)])
    missing = set(model.state_dict()) - set(state)
    for k in missing:  # layers stored without a bias: zero bias
        if k.endswith("bias"):
            state[k] = torch.zeros_like(model.state_dict()[k])
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()})
    return model


def load_lbdn(path: str | Path, dtype: torch.dtype | None = None) -> LBDN:
    """Load an LBDN module from a lipcert safetensors file."""
    return lbdn_from_tensors(*read_safetensors(path), dtype=dtype)


def lbdn_jl_tensors(npz_path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, config) of a RobustNeuralNetworks.jl LBDN's direct parameters in lipcert/1.

    The npz (layout in docs/formats.md) holds ``XY<k>`` = [X; Y] ((n_out + n_in), n_out),
    ``alpha<k>``, ``d<k>`` (hidden layers), ``b<k>``, ``log_gamma`` and ``layer_sizes``;
    its forward pass is exactly the sandwich forward of design.md §3.4 with [X; Y] rescaled to
    norm alpha_k. Arrays keep their float dtype. Raises ValueError naming what is missing or
    misshapen (the file is read with ``allow_pickle=False``).
    """
    with np.load(npz_path, allow_pickle=False) as z:
        arr = {k: z[k] for k in z.files}
    for key in ("layer_sizes", "log_gamma"):
        if key not in arr:
            raise ValueError(f"no array {key!r} (has {sorted(arr)})")
    sizes = [int(v) for v in np.asarray(arr["layer_sizes"]).reshape(-1)]
    if len(sizes) < 2 or min(sizes) <= 0:
        raise ValueError(f"layer_sizes must list >= 2 positive sizes, got {sizes}")
    n_layers = len(sizes) - 1
    log_gamma = np.asarray(arr["log_gamma"], dtype=np.float32).reshape(-1)
    if log_gamma.shape != (1,) or not np.isfinite(log_gamma).all():
        raise ValueError("log_gamma must hold one finite number")

    def get(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in arr:
            raise ValueError(f"no array {key!r} for layer_sizes {sizes}")
        a = np.asarray(arr[key])
        if a.size != math.prod(shape) or (a.shape != shape and a.ndim > 1):
            raise ValueError(f"{key} has shape {a.shape}, expected {shape}")
        if a.dtype.kind != "f":
            raise ValueError(f"{key} must be a float array, not {a.dtype}")
        return np.ascontiguousarray(a.reshape(shape))

    tensors: dict[str, np.ndarray] = {"log_gamma": log_gamma}
    specs: list[dict[str, Any]] = []
    for k in range(1, n_layers + 1):
        last = k == n_layers
        n_in, n_out = sizes[k - 1], sizes[k]
        pre = "output." if last else f"hidden.{k - 1}."
        ts = {"XY": pre + "XY", "alpha": pre + "alpha", "b": pre + "bias"}
        tensors[pre + "XY"] = get(f"XY{k}", (n_out + n_in, n_out))
        tensors[pre + "alpha"] = get(f"alpha{k}", (1,))
        tensors[pre + "bias"] = get(f"b{k}", (n_out,))
        spec: dict[str, Any] = {
            "type": "sandwich_output" if last else "sandwich",
            "in": n_in,
            "out": n_out,
            "tensors": ts,
        }
        if not last:
            ts["d"] = pre + "d"
            tensors[pre + "d"] = get(f"d{k}", (n_out,))
            spec["activation"] = "relu"
        specs.append(spec)
    config = {
        "format": "lipcert/1",
        "kind": "sandwich",
        "gamma": float(math.exp(float(log_gamma[0]))),
        "input_shape": [sizes[0]],
        "tensors": {"log_gamma": "log_gamma"},
        "layers": specs,
        "source": "RobustNeuralNetworks.jl LBDN (direct parameters)",
    }
    return tensors, config


def convert_lbdn_jl(npz_path: str | Path, out_path: str | Path) -> Path:
    """Write a RobustNeuralNetworks.jl LBDN (:func:`lbdn_jl_tensors`'s npz) as a lipcert/1
    safetensors file; returns ``out_path``."""
    tensors, config = lbdn_jl_tensors(npz_path)
    out = Path(out_path)
    out.write_bytes(np_save(tensors, metadata={METADATA_KEY: config_json(config)}))
    return out
