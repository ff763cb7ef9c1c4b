"""``/dashboard`` on the management port: a live web view of the fleet.

Served only with ``--management-dashboard-enable``; otherwise ``/dashboard`` is 404.

One static page, its script and its stylesheet, shipped in the package (``static/``) and read
once at start-up: no build step, nothing fetched at run time. The script polls
``/api/v1/agents`` and ``/api/v1/stats`` every second and redraws in place, so the page itself
never reloads. It is read-only and shows nothing that those two endpoints do not (no token, no
API key).

The page loads its files and calls the API by relative URLs, so it keeps working behind a
reverse proxy that mounts the management port under a path prefix.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

_FILES = {
    "": ("dashboard.html", "text/html"),
    "/dashboard.js": ("dashboard.js", "text/javascript"),
    "/dashboard.css": ("dashboard.css", "text/css"),
}

_HEADERS = {
    # Only our own files may run or style the page, and it may only talk back to this port.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class WebDashboard:
    def __init__(self) -> None:
        static = resources.files(__package__ or "paddler.balancer.management") / "static"
        self._files = {
            suffix: (static.joinpath(name).read_bytes(), content_type)
            for suffix, (name, content_type) in _FILES.items()
        }

    def add_routes(self, app: web.Application) -> None:
        for suffix in self._files:
            app.router.add_get(f"/dashboard{suffix}", self._serve)
        app.router.add_get("/dashboard/", self._redirect)

    async def _serve(self, request: web.Request) -> web.Response:
        body, content_type = self._files[request.path.removeprefix("/dashboard")]
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=_HEADERS)

    async def _redirect(self, request: web.Request) -> web.Response:
        # Relative, so that a path prefix added by a proxy in front is kept.
        raise web.HTTPFound("../dashboard")
