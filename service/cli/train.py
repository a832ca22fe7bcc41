"""``lipcert train``: train a sandwich (LBDN) network and save it as .safetensors."""

from __future__ import annotations

from service.cli._common import fail


def train() -> None:
    """Train an LBDN with a certified Lipschitz bound gamma."""
    fail("train is not implemented yet")
