"""`/docs` (Swagger UI) and `/redoc` (ReDoc) that work behind an air gap.

FastAPI's own pages load Swagger UI, ReDoc and a favicon from public CDNs (and ReDoc's fonts from
Google Fonts), so without internet they stay blank. `install_offline_docs` replaces them with the
same pages loading the same assets from this installation: the files that PyPI's
`fastapi-offline` package ships (Swagger UI 5 and ReDoc 2 bundles, copied from those CDNs), served
under `/docs/assets/`, with a Content-Security-Policy that lets the pages load nothing from
anywhere else. Nothing is fetched at run time.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs/assets"
# The pages may load only from this service: the ReDoc bundle would otherwise still fetch its
# footer logo from Redocly's CDN (the image hides itself when that fails). Inline scripts and
# styles are the pages' own (FastAPI's templates); ReDoc runs its search in a blob: worker.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'"
)


def asset_directory() -> Path:
    return Path(str(resources.files("fastapi_offline").joinpath("static")))


def install_offline_docs(app: FastAPI) -> None:
    """Serve `app`'s docs pages (at its docs_url and redoc_url) from local assets instead of
    the CDN pages FastAPI installed; the OpenAPI document stays where it was."""
    docs_url, redoc_url, openapi_url = app.docs_url, app.redoc_url, app.openapi_url
    oauth2_url = app.swagger_ui_oauth2_redirect_url
    replaced = {docs_url, redoc_url, oauth2_url} - {None}
    routes = app.router.routes
    routes[:] = [route for route in routes if getattr(route, "path", None) not in replaced]
    if openapi_url is None or not replaced:
        return
    app.mount(ASSETS_URL, StaticFiles(directory=asset_directory()), name="docs-assets")

    def assets(request: Request) -> str:
        return f"{request.scope.get('root_path', '')}{ASSETS_URL}"

    if docs_url is not None:

        @app.get(docs_url, include_in_schema=False)
        async def swagger_ui(request: Request) -> HTMLResponse:
            root = request.scope.get("root_path", "")
            return _confined(
                get_swagger_ui_html(
                    openapi_url=f"{root}{openapi_url}",
                    title=f"{app.title} - Swagger UI",
                    oauth2_redirect_url=oauth2_url,
                    swagger_js_url=f"{assets(request)}/swagger-ui-bundle.js",
                    swagger_css_url=f"{assets(request)}/swagger-ui.css",
                    swagger_favicon_url=f"{assets(request)}/favicon.png",
                    swagger_ui_parameters=app.swagger_ui_parameters,
                )
            )

        if oauth2_url is not None:

            @app.get(oauth2_url, include_in_schema=False)
            async def swagger_ui_redirect() -> HTMLResponse:
                return get_swagger_ui_oauth2_redirect_html()

    if redoc_url is not None:

        @app.get(redoc_url, include_in_schema=False)
        async def redoc(request: Request) -> HTMLResponse:
            root = request.scope.get("root_path", "")
            return _confined(
                get_redoc_html(
                    openapi_url=f"{root}{openapi_url}",
                    title=f"{app.title} - ReDoc",
                    redoc_js_url=f"{assets(request)}/redoc.standalone.js",
                    redoc_favicon_url=f"{assets(request)}/favicon.png",
                    with_google_fonts=False,
                )
            )


def _confined(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return page
