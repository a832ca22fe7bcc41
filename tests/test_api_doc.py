"""docs/api.md lists exactly the routes the app serves (from its OpenAPI document)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "api.md").read_text()
ROUTE = re.compile(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`\s]*)`")


def test_api_doc_lists_every_route(tmp_path: Path) -> None:
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(data_dir=tmp_path))
    served = {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    }
    documented = set(ROUTE.findall(DOC))
    assert served - documented == set(), "routes missing from docs/api.md"
    assert documented - served == set(), "docs/api.md documents routes the app lacks"


def test_api_doc_states_the_radius_and_auth_rules() -> None:
    assert "radius = m / (sqrt(2) L)" in DOC
    assert "X-API-Key" in DOC and "application/problem+json" in DOC
