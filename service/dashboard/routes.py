"""Routes of the dashboard and of the offline API docs (see :mod:`service.dashboard`)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

HERE = Path(__file__).resolve().parent
STATIC_URL = "/ui/static"
DOCS_ASSETS_URL = "/ui/docs-assets"

templates = Jinja2Templates(directory=str(HERE / "templates"))
router = APIRouter(include_in_schema=False)


def docs_assets_dir() -> Path:
    """The Swagger UI and ReDoc bundles shipped by the ``fastapi-offline`` package."""
    return Path(str(resources.files("fastapi_offline") / "static"))


def _page(request: Request, name: str, **extra: object) -> HTMLResponse:
    app = request.app
    root = request.scope.get("root_path", "")
    context = {
        "title": app.title,
        "version": app.version,
        "root": root,
        "static": root + STATIC_URL,
        "docs_assets": root + DOCS_ASSETS_URL,
        "openapi_url": root + (app.openapi_url or "/openapi.json"),
        **extra,
    }
    response = templates.TemplateResponse(request, name, context)
    # the pages load nothing from elsewhere: say so to the browser as well
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
        "script-src 'self' 'unsafe-inline'; worker-src 'self' blob:; connect-src 'self'"
    )
    return response


@router.get("/", response_class=HTMLResponse)
async def dashboard(request: Request) -> HTMLResponse:
    return _page(request, "index.html")


@router.get("/docs", response_class=HTMLResponse)
async def swagger_ui(request: Request) -> HTMLResponse:
    return _page(request, "docs.html")


@router.get("/redoc", response_class=HTMLResponse)
async def redoc(request: Request) -> HTMLResponse:
    return _page(request, "redoc.html")


def install(app: FastAPI) -> None:
    """Add the dashboard, ``/docs``, ``/redoc`` and their static assets to ``app``."""
    app.mount(STATIC_URL, StaticFiles(directory=str(HERE / "static")), name="ui-static")
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=str(docs_assets_dir())), name="ui-docs")
    app.include_router(router)
