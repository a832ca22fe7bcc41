"""Sandwich (LBDN) networks in numpy: Cayley transform, the equivalent plain network, and the
closed-form LipSDP certificate check (DESIGN §3.4).

A hidden sandwich layer (p inputs -> q outputs) has free parameters ``XY = [X; Y]``
((q + p) x q), optionally rescaled to Frobenius norm ``alpha``, ``d`` (q) and ``b`` (q)::

    Z   = X - X^T + Y^T Y
    A^T = (I + Z)^{-1} (I - Z),     B^T = -2 Y (I + Z)^{-1},      so  A A^T + B B^T = I_q
    h_out = sqrt(2) A^T Psi sigma( sqrt(2) Psi^{-1} B h_in + b ),   Psi = diag(exp(d)).

An LBDN with scale gamma is ``h = sqrt(gamma) x``, L hidden sandwich layers, and the output
layer ``y = sqrt(gamma) B_L h + b_L``. Its equivalent plain network (z_{k+1} = sigma(W_k z_k + b_k))
has ``W_k = 2 Psi_k^{-1} B_k A_{k-1}^T Psi_{k-1}`` (A_{-1} = I, Psi_{-1} = sqrt(gamma/2) I) and
``W_L = sqrt(2 gamma) B_L A_{L-1}^T Psi_{L-1}``.

Explicit LipSDP-Neuron certificate. In the convention of :mod:`sdp.certificate` (slope sector
[0, 1], neuron quadratic constraint ``2 dv^T T (du - dv) >= 0``), each layer satisfies the
identity ``|dh_in|^2 - |dh_out|^2 - QC(Psi^2) = |dh_in - sqrt(2) B^T Psi dv|^2 >= 0``. Summing
over layers and using ``|dy|^2 <= gamma |dh_{L-1}|^2``::

    gamma^2 |dx|^2 - |dy|^2 - sum_k QC_k(gamma Psi_k^2) >= 0,

i.e. ``M(rho = gamma^2, T_k = gamma Psi_k^2) <= 0``. Warning: ``T = gamma Psi^2``, not
``Psi^2 / 2``; the latter does not verify (tested).

The certificate is tight (M is singular along some directions), and the hidden block H(T) is
singular when a layer widens (p < q). :func:`explicit_certificate` therefore takes a ``slack``
r in [0, 1): it weights layer k's identity by (1 - r)^k, which adds ``r |dh_k|^2``-sized
strictly positive terms, giving ``T_k = gamma Psi_k^2 (1-r)^{k-L}``, ``rho = gamma^2 (1-r)^{-L}``.

References:
    R. Wang, I. R. Manchester, "Direct Parameterization of Lipschitz-Bounded Deep Networks",
    ICML 2023. M. Fazlyab et al., "Efficient and Accurate Estimation of Lipschitz Constants
    for Deep Neural Networks", NeurIPS 2019.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import linalg

from sdp._blas import one_thread
from sdp.bounds.result import BoundResult
from sdp.certificate import Certificate, Lmi, certify_multipliers, certify_rho
from sdp.errors import CertificateError, ModelRejected, NotApplicable
from sdp.ir import Activation, Array, Dense, Network

CONFIG_FORMAT = "lipcert/1"
CLOSED_FORM_RTOL = 1e-6
"""The closed form is confirmed when the verified bound is <= gamma * (1 + CLOSED_FORM_RTOL)."""
SLACKS = (0.0, 1e-9, 1e-8, 1e-7)
"""Slacks r tried in turn by :func:`sandwich_bound` (sqrt(rho) = gamma (1-r)^{-L/2})."""

LayerType = Literal["sandwich", "sandwich_output"]


@dataclass(frozen=True, eq=False)
class SandwichLayer:
    """Raw parameters of one sandwich layer (float64 copies).

    ``xy``: [X; Y], shape (q + p, q). ``alpha``: None or the Frobenius norm [X; Y] is rescaled
    to. ``d``: (q,) for hidden layers, None for the output layer. ``b``: (q,).
    """

    type: LayerType
    xy: Array
    b: Array
    d: Array | None = None
    alpha: float | None = None
    activation: Activation | None = None

    @property
    def out_features(self) -> int:
        return int(self.xy.shape[1])

    @property
    def in_features(self) -> int:
        return int(self.xy.shape[0] - self.xy.shape[1])

    def cayley(self) -> tuple[Array, Array]:
        """(A, B) with A (q x q), B (q x p) and A A^T + B B^T = I (float64)."""
        return cayley(self.xy, self.alpha)

    @property
    def psi(self) -> Array:
        assert self.d is not None
        return np.exp(self.d)


@dataclass(frozen=True, eq=False)
class SandwichParams:
    """An LBDN's raw parameters: hidden layers, the output layer, and the scale.

    ``gamma`` is the scale the forward pass uses (h_0 = sqrt(gamma) x); ``claimed_gamma`` is
    the bound written in the file's metadata, the claim :func:`sandwich_bound` checks.
    """

    gamma: float
    layers: tuple[SandwichLayer, ...]
    input_shape: tuple[int, ...]
    claimed_gamma: float | None = None

    @property
    def hidden(self) -> tuple[SandwichLayer, ...]:
        return self.layers[:-1]

    @property
    def output(self) -> SandwichLayer:
        return self.layers[-1]

    @property
    def activation(self) -> Activation | None:
        """The hidden activation when all hidden layers share one (else the first)."""
        return self.hidden[0].activation if self.hidden else None


def cayley(xy: Array, alpha: float | None = None) -> tuple[Array, Array]:
    """Cayley transform of [X; Y] (q + p, q), optionally rescaled to Frobenius norm ``alpha``.

    Z = X - X^T + Y^T Y; A^T = (I + Z)^{-1}(I - Z); B^T = -2 Y (I + Z)^{-1}. I + Z is always
    invertible (its symmetric part is I + Y^T Y >= I). Returns (A, B), A (q, q), B (q, p).
    """
    xy = np.asarray(xy, dtype=np.float64)
    q = xy.shape[1]
    if alpha is not None:
        norm = float(np.linalg.norm(xy))
        xy = xy * (alpha / norm) if norm > 0 else xy
    x, y = xy[:q], xy[q:]
    z = x - x.T + y.T @ y
    eye = np.eye(q)
    lu = linalg.lu_factor(eye + z)
    a_t = linalg.lu_solve(lu, eye - z)
    # B^T = -2 Y (I+Z)^{-1}  <=>  B = -2 (I+Z)^{-T} Y^T
    b = -2.0 * linalg.lu_solve(lu, y.T, trans=1)
    return a_t.T, b


def plain_weights(params: SandwichParams) -> list[tuple[Array, Array]]:
    """(W_k, b_k) of the equivalent plain network, k = 0..L (DESIGN §3.4), in float64.

    Deterministic: BLAS runs on one thread (:mod:`sdp._blas`), so the weights are the same
    bits in every process (the closed-form check compares them exactly with the imported ones).
    """
    with one_thread():
        return _plain_weights(params)


def _plain_weights(params: SandwichParams) -> list[tuple[Array, Array]]:
    out: list[tuple[Array, Array]] = []
    a_prev_t: Array | None = None  # A_{k-1}^T Psi_{k-1} (None: sqrt(gamma/2) I)
    for layer in params.hidden:
        a, b = layer.cayley()
        right = b * math.sqrt(params.gamma / 2) if a_prev_t is None else b @ a_prev_t
        out.append(((2.0 / layer.psi)[:, None] * right, layer.b))
        a_prev_t = a.T * layer.psi[None, :]
    _, b_out = params.output.cayley()
    if a_prev_t is None:  # no hidden layer: y = sqrt(gamma) B_L sqrt(gamma) x + b_L
        w_out = params.gamma * b_out
    else:
        w_out = math.sqrt(2 * params.gamma) * (b_out @ a_prev_t)
    out.append((w_out, params.output.b))
    return out


def plain_network(params: SandwichParams, *, with_params: bool = True) -> Network:
    """The forward-equivalent plain network (Dense + Activation ops) in the sdp IR."""
    ops: list[Any] = []
    weights = plain_weights(params)
    for (w, b), layer in zip(weights[:-1], params.hidden, strict=True):
        ops.append(Dense(w, b))
        ops.append(layer.activation or Activation("relu"))
    ops.append(Dense(*weights[-1]))
    return Network(params.input_shape, tuple(ops), sandwich=params if with_params else None)


def sandwich_forward(params: SandwichParams, x: Array) -> Array:
    """The sandwich forward pass itself (float64, batched), independent of plain_weights."""
    h = math.sqrt(params.gamma) * np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    for layer in params.hidden:
        a, b = layer.cayley()
        act = layer.activation or Activation("relu")
        u = math.sqrt(2.0) * (h @ b.T) / layer.psi + layer.b
        h = math.sqrt(2.0) * (act(u) * layer.psi) @ a
    _, b_out = params.output.cayley()
    return math.sqrt(params.gamma) * (h @ b_out.T) + params.output.b


def explicit_certificate(params: SandwichParams, *, slack: float = 0.0) -> Certificate:
    """rho = gamma^2 (1-r)^{-L}, T_k = gamma Psi_k^2 (1-r)^{k-L} (slack r; see module doc)."""
    if not 0.0 <= slack < 1.0:
        raise ValueError("slack must be in [0, 1)")
    g, L = params.gamma, len(params.hidden)
    s = 1.0 - slack
    t = tuple(g * layer.psi**2 * s ** (k - L) for k, layer in enumerate(params.hidden))
    return Certificate(rho=g * g * s ** (-L), multipliers=t, meta={"slack": slack})


def closed_form_lmi(params: SandwichParams) -> Lmi:
    """LMI of the plain network in the slope sector [0, 1] (valid: every slope lies in [0, 1])."""
    for layer in params.hidden:
        act = layer.activation or Activation("relu")
        lo, hi = act.slope_bounds
        if lo < 0.0 or hi > 1.0:
            raise NotApplicable(
                f"activation {act.name} has slopes [{lo:g}, {hi:g}] outside [0, 1]; "
                "the sandwich closed form needs slopes in [0, 1]"
            )
    ws = tuple(w for w, _ in plain_weights(params))
    zeros = tuple(np.zeros(w.shape[0]) for w in ws[:-1])
    ones = tuple(np.ones(w.shape[0]) for w in ws[:-1])
    return Lmi(ws, zeros, ones)


def _matches(net: Network, plain: Network) -> bool:
    if len(net.ops) != len(plain.ops):
        return False
    for a, b in zip(net.ops, plain.ops, strict=True):
        if isinstance(b, Dense):
            if not isinstance(a, Dense) or a.weight.shape != b.weight.shape:
                return False
            if not (np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias)):
                return False
        elif a != b:
            return False
    return True


def sandwich_bound(net: Network) -> BoundResult:
    """Closed-form check of a sandwich network's Lipschitz bound (method "sandwich"), no solver.

    Rebuilds W_k from ``net.sandwich`` in float64, checks that they are the network's own ops,
    and verifies M(rho, T) <= 0 for the explicit T (slack 0, then tiny slacks) with
    :func:`sdp.certificate.certify_rho`. The reported value is the verified sqrt(rho), never
    the gamma in the metadata: that claim is *confirmed* (note + ``certificate.meta``) only
    when sqrt(rho) <= claimed_gamma (1 + CLOSED_FORM_RTOL). If no explicit T verifies
    (numerical trouble), the explicit T is repaired by :func:`certify_multipliers`.
    """
    params = net.sandwich
    if type(params).__name__ == "ConvSandwichParams":  # per-frequency check
        from sdp.sandwich_conv_check import conv_sandwich_bound

        return conv_sandwich_bound(net)
    if not isinstance(params, SandwichParams):
        raise NotApplicable("not a sandwich network: the closed-form check needs its raw params")
    t0 = time.perf_counter()
    plain = plain_network(params)
    if not _matches(net, plain):
        raise CertificateError(
            "the network's layers are not the ones its sandwich parameters define",
            code="sandwich-mismatch",
        )
    lmi = closed_form_lmi(params)
    notes: list[str] = []
    rho: float | None = None
    mult: tuple[Array, ...] = ()
    used_slack: float | None = None
    for slack in SLACKS:
        cert = explicit_certificate(params, slack=slack)
        try:
            rho = certify_rho(lmi, cert.multipliers)
        except CertificateError:
            continue
        mult, used_slack = cert.multipliers, slack
        break
    if rho is None:
        rep = certify_multipliers(lmi, explicit_certificate(params).multipliers)
        rho, mult = rep.rho, rep.multipliers
        notes.append(f"explicit certificate did not verify numerically; {rep.note}")
    value = math.sqrt(rho)
    claim = params.claimed_gamma if params.claimed_gamma is not None else params.gamma
    confirmed = value <= claim * (1 + CLOSED_FORM_RTOL)
    if confirmed:
        notes.append(
            f"closed form confirmed: gamma = {claim:.9g} (explicit T = gamma Psi^2, "
            f"slack {used_slack:g}); verified sqrt(rho) = {value:.9g}"
        )
    else:
        notes.append(
            f"claimed gamma = {claim:.9g} NOT confirmed; the verified bound is {value:.9g}"
        )
    naive = math.prod(float(np.linalg.norm(w, 2)) for w in lmi.weights)
    notes.append(f"naive product of spectral norms of the plain network: {naive:.6g}")
    return sandwich_result(
        net,
        rho,
        mult,
        claim=claim,
        confirmed=confirmed,
        meta={"slack": used_slack},
        notes=notes,
        t0=t0,
    )


def sandwich_result(
    net: Network,
    rho: float,
    multipliers: tuple[Array, ...],
    *,
    claim: float,
    confirmed: bool,
    meta: Mapping[str, Any],
    notes: Sequence[str],
    t0: float,
) -> BoundResult:
    """The verified "sandwich" result sqrt(rho) with its certificate (rho, T) on ``net``.

    ``meta`` (check details) goes into the certificate's meta between the claim and the slope
    sector [0, 1]; ``t0`` is the perf_counter at the start of the check.
    """
    cert = Certificate(
        rho=rho,
        multipliers=multipliers,
        network_hash=net.content_hash(),
        meta={
            "method": "sandwich",
            "claimed_gamma": claim,
            "closed_form_confirmed": confirmed,
            **meta,
            "slope_sector": [0.0, 1.0],
        },
    )
    total = time.perf_counter() - t0
    return BoundResult(
        value=math.sqrt(rho),
        method="sandwich",
        verified=True,
        certificate=cert,
        timings={"solve_s": total, "total_s": total},
        notes=tuple(notes),
        requested_method="sandwich",
    )


# --------------------------------------------------------------------------- safetensors config


def _reject(detail: str, code: str = "invalid-config") -> ModelRejected:
    return ModelRejected(detail, code=code)


def _tensor(tensors: Mapping[str, Any], name: Any, shape: tuple[int, ...], what: str) -> Array:
    if not isinstance(name, str) or name not in tensors:
        raise _reject(f"{what}: tensor {name!r} is missing", "missing-tensor")
    arr = np.asarray(tensors[name])
    if arr.dtype.kind not in "fiu":
        raise _reject(f"{what}: tensor {name!r} is not numeric", "unsupported-dtype")
    arr = arr.astype(np.float64)
    if arr.shape != shape and not (arr.size == 1 and math.prod(shape) == 1):
        raise _reject(
            f"{what}: tensor {name!r} has shape {arr.shape}, expected {shape}", "shape-mismatch"
        )
    if not np.all(np.isfinite(arr)):
        raise _reject(f"{what}: tensor {name!r} has non-finite values", "non-finite")
    return arr.reshape(shape)


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise _reject(f"{what} must be a positive integer, got {v!r}")
    return v


def _float(v: Any, what: str, *, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise _reject(f"{what} must be a finite number, got {v!r}")
    if positive and v <= 0:
        raise _reject(f"{what} must be > 0, got {v!r}")
    return float(v)


def params_from_safetensors(
    tensors: Mapping[str, Any], config: Mapping[str, Any]
) -> SandwichParams:
    """Validate a "sandwich" lipcert/1 config against its tensors (untrusted input).

    Config::

        {"format": "lipcert/1", "kind": "sandwich", "gamma": 5.0, "input_shape": [784],
         "tensors": {"log_gamma": "log_gamma"},            # optional: the forward's scale
         "layers": [{"type": "sandwich", "in": 784, "out": 64, "activation": "relu",
                     "activation_param": 0.0,
                     "tensors": {"XY": ..., "alpha": ..., "d": ..., "b": ...}}, ...,
                    {"type": "sandwich_output", "in": 64, "out": 10,
                     "tensors": {"XY": ..., "alpha": ..., "b": ...}}]}

    ``alpha`` and ``b`` are optional (no rescaling; zero bias). The scale is exp(log_gamma)
    when that tensor is given, else ``gamma``; ``gamma`` is always the claim.
    """
    if not isinstance(config, Mapping):
        raise _reject("config must be a JSON object")
    if config.get("format") != CONFIG_FORMAT or config.get("kind") != "sandwich":
        raise _reject(f"expected format {CONFIG_FORMAT!r} and kind 'sandwich'")
    claimed = _float(config.get("gamma"), "gamma", positive=True)
    shape_raw = config.get("input_shape")
    if not isinstance(shape_raw, list) or not shape_raw:
        raise _reject("input_shape must be a non-empty list")
    input_shape = tuple(_int(v, "input_shape entry") for v in shape_raw)
    top = config.get("tensors", {}) or {}
    if not isinstance(top, Mapping):
        raise _reject("tensors must be an object")
    gamma = claimed
    if "log_gamma" in top:
        gamma = math.exp(float(_tensor(tensors, top["log_gamma"], (1,), "log_gamma")[0]))
        if not (math.isfinite(gamma) and gamma > 0):
            raise _reject("log_gamma gives a non-finite scale")
    specs = config.get("layers")
    if not isinstance(specs, list) or not specs:
        raise _reject("layers must be a non-empty list")
    layers: list[SandwichLayer] = []
    n = math.prod(input_shape)
    for i, spec in enumerate(specs):
        what = f"layer {i}"
        if not isinstance(spec, Mapping):
            raise _reject(f"{what} must be an object")
        kind = spec.get("type")
        last = i == len(specs) - 1
        if kind != ("sandwich_output" if last else "sandwich"):
            raise _reject(
                f"{what}: type {kind!r}; expected hidden 'sandwich' layers then one "
                "'sandwich_output'",
                "unsupported-layer",
            )
        p, q = _int(spec.get("in"), f"{what} in"), _int(spec.get("out"), f"{what} out")
        if p != n:
            raise _reject(f"{what} expects {p} inputs but receives {n}", "shape-mismatch")
        ts = spec.get("tensors")
        if not isinstance(ts, Mapping):
            raise _reject(f"{what}: tensors must be an object")
        xy = _tensor(tensors, ts.get("XY"), (q + p, q), f"{what} XY")
        b = _tensor(tensors, ts["b"], (q,), f"{what} b") if "b" in ts else np.zeros(q)
        alpha = None
        if "alpha" in ts:
            alpha = float(_tensor(tensors, ts["alpha"], (1,), f"{what} alpha")[0])
        d = act = None
        if not last:
            d = _tensor(tensors, ts.get("d"), (q,), f"{what} d")
            if np.max(np.abs(d)) > 300:
                raise _reject(f"{what}: |d| > 300 overflows exp(d)", "non-finite")
            try:
                act = Activation(
                    spec.get("activation", "relu"),
                    _float(spec.get("activation_param", 0.0), f"{what} param"),
                )
            except (ValueError, TypeError) as e:
                raise _reject(f"{what}: {e}", "unsupported-activation") from e
        layers.append(SandwichLayer(kind, xy, b, d, alpha, act))
        n = q
    return SandwichParams(gamma, tuple(layers), input_shape, claimed)


def network_from_safetensors(tensors: Mapping[str, Any], config: Mapping[str, Any]) -> Network:
    """The plain IR network of a sandwich safetensors file, with ``Network.sandwich`` set."""
    from sdp import sandwich_conv_io

    if sandwich_conv_io.is_conv_config(config):
        return sandwich_conv_io.network_from_safetensors(tensors, config)
    params = params_from_safetensors(tensors, config)
    try:
        return plain_network(params)
    except (ValueError, linalg.LinAlgError) as e:
        raise _reject(f"cannot build the sandwich network: {e}") from e


def params_to_safetensors(params: SandwichParams) -> tuple[dict[str, Array], dict[str, Any]]:
    """(tensors, config) of :func:`params_from_safetensors`'s format (float64 tensors)."""
    tensors: dict[str, Array] = {"log_gamma": np.array([math.log(params.gamma)])}
    specs: list[dict[str, Any]] = []
    for i, layer in enumerate(params.layers):
        pre = f"layers.{i}."
        ts = {"XY": pre + "XY", "b": pre + "b"}
        tensors[pre + "XY"] = layer.xy
        tensors[pre + "b"] = layer.b
        if layer.alpha is not None:
            ts["alpha"] = pre + "alpha"
            tensors[pre + "alpha"] = np.array([layer.alpha])
        spec: dict[str, Any] = {
            "type": layer.type,
            "in": layer.in_features,
            "out": layer.out_features,
            "tensors": ts,
        }
        if layer.d is not None:
            ts["d"] = pre + "d"
            tensors[pre + "d"] = layer.d
            act = layer.activation or Activation("relu")
            spec["activation"], spec["activation_param"] = act.name, act.param
        specs.append(spec)
    claim = params.claimed_gamma if params.claimed_gamma is not None else params.gamma
    config = {
        "format": CONFIG_FORMAT,
        "kind": "sandwich",
        "gamma": claim,
        "input_shape": list(params.input_shape),
        "tensors": {"log_gamma": "log_gamma"},
        "layers": specs,
    }
    return tensors, config


def config_json(config: Mapping[str, Any]) -> str:
    """The metadata string stored under the safetensors key "lipcert"."""
    return json.dumps(config, separators=(",", ":"))


def random_params(
    rng: np.random.Generator,
    sizes: Sequence[int],
    gamma: float,
    *,
    activation: Activation | None = None,
    d_scale: float = 0.3,
) -> SandwichParams:
    """Random sandwich parameters for tests and benchmarks (sizes = [n0, ..., n_out])."""
    layers = []
    for i, (p, q) in enumerate(itertools.pairwise(sizes)):
        last = i == len(sizes) - 2
        xy = rng.standard_normal((q + p, q)) / math.sqrt(q)
        d = None if last else d_scale * rng.standard_normal(q)
        layers.append(
            SandwichLayer(
                "sandwich_output" if last else "sandwich",
                xy,
                0.1 * rng.standard_normal(q),
                d,
                None,
                None if last else (activation or Activation("relu")),
            )
        )
    return SandwichParams(float(gamma), tuple(layers), (int(sizes[0]),), float(gamma))
