"""One validation plan (sdp.bounds.plan) for compute_bound and the service's bounds route."""

from __future__ import annotations

import numpy as np
import pytest

from sdp.bounds import compute_bound
from sdp.bounds.plan import METHODS, check_bound_request
from sdp.errors import NotApplicable, SolverError, UnknownSolver, UnsupportedMethod
from sdp.ir import Activation, Dense, Network, Residual


def _chain() -> Network:
    rng = np.random.default_rng(0)
    return Network(
        (3,),
        (
            Dense(rng.standard_normal((4, 3)), np.zeros(4)),
            Activation("relu"),
            Dense(rng.standard_normal((2, 4)), np.zeros(2)),
        ),
    )


def _residual(act: str = "relu") -> Network:
    rng = np.random.default_rng(1)
    phi = Activation(act)  # type: ignore[arg-type]
    block = Residual((Dense(rng.standard_normal((3, 3)), np.zeros(3)), phi))
    return Network((3,), (block, Dense(rng.standard_normal((2, 3)), np.zeros(2))))


@pytest.mark.parametrize(
    ("net", "method", "kw", "error", "code"),
    [
        (_chain(), "lipsdp-network", {}, UnsupportedMethod, "unsupported-method"),
        (_chain(), "nope", {}, UnsupportedMethod, "unsupported-method"),
        (_chain(), "naive", {"solver": "no-such"}, UnknownSolver, "solver-unknown"),
        (_chain(), "sandwich", {}, NotApplicable, "method-not-applicable"),
        (_residual(), "lipsdp-neuron", {}, NotApplicable, "method-not-applicable"),
        (_residual(), "naive", {"pairwise": True}, NotApplicable, "method-not-applicable"),
        (_residual("gelu"), "lipsdp-dag", {}, NotApplicable, "method-not-applicable"),
    ],
)
def test_plan_and_compute_bound_refuse_alike(net, method, kw, error, code) -> None:
    with pytest.raises(error) as planned:
        check_bound_request(net, method, **kw)
    with pytest.raises(error) as computed:
        compute_bound(net, method, lower_bound=False, **kw)
    assert planned.value.code == computed.value.code == code
    assert str(planned.value) == str(computed.value)


def test_unknown_solver_is_a_request_error_and_a_solver_error() -> None:
    assert issubclass(UnknownSolver, SolverError)  # callers catching SolverError still do


@pytest.mark.parametrize("method", METHODS)
def test_plan_accepts_what_compute_bound_runs(method: str) -> None:
    net = _chain()
    if method == "sandwich":
        with pytest.raises(NotApplicable):
            check_bound_request(net, method)
        return
    check_bound_request(net, method, solver="structured")
    assert compute_bound(net, method, solver="structured", lower_bound=False).verified
