"""The browser face of the service: the dashboard at ``/`` and the API docs at ``/docs`` and
``/redoc``, every asset served by the app itself (no CDN, same pages with and without internet).

:func:`install` adds them to an app built with ``docs_url=None, redoc_url=None``:

- ``/``: the dashboard (Jinja2 template + plain JavaScript over the ``/v1`` API; plots are SVG
  drawn in the page), assets under ``/ui/static``;
- ``/docs``: Swagger UI, ``/redoc``: ReDoc, their scripts and styles from the
  ``fastapi-offline`` package (which ships the released Swagger UI and ReDoc bundles) under
  ``/ui/docs-assets``. Swagger UI keeps what is typed into *Authorize* for the session and,
  when the dashboard holds an API key in ``sessionStorage``, sends it as ``X-API-Key``.

The pages and assets are public (like ``/openapi.json``); every ``/v1`` call the dashboard makes
carries the key it asked for, read from ``sessionStorage`` and sent as a header, never in a URL.
"""

from __future__ import annotations

from service.dashboard.routes import install

__all__ = ["install"]
