"""``/docs``: the API's own documentation (Swagger UI), served from this API. FastAPI's
default page loads Swagger UI from a CDN, which a farm with no internet access cannot
reach; the same files come from the swagger-ui-bundle package instead."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from swagger_ui_bundle import swagger_ui_path

from kinod.api.errors import ApiError

router = APIRouter()

ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
          "favicon-32x32.png": "image/png"}
PREFIX = "/ui/swagger/"  # under /ui/: static files, which load without the token


@router.get("/docs", include_in_schema=False)
async def docs() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="kinod API",
                               swagger_js_url=PREFIX + "swagger-ui-bundle.js",
                               swagger_css_url=PREFIX + "swagger-ui.css",
                               swagger_favicon_url=PREFIX + "favicon-32x32.png")


@router.get(PREFIX + "{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    media_type = ASSETS.get(name)  # named files only: nothing else of the package is served
    if media_type is None:
        raise ApiError(404, "not_found", f"no file {name}")
    return FileResponse(swagger_ui_path / name, media_type=media_type)
