"""Container health probe: ``python -m service.healthcheck`` exits 0 when the API is live.

Sends ``GET http://127.0.0.1:$PORT/v2/health/live`` (PORT defaults to 8000) and exits 0 on
HTTP 200, 1 on anything else (refused connection, timeout, error status). Standard library
only, so the probe stays cheap: it imports neither FastAPI nor torch. Used by the
Dockerfile's HEALTHCHECK and the compose file's ``healthcheck``.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

LIVE_PATH = "/v2/health/live"


def live_url(environ: dict[str, str] | None = None) -> str:
    """The URL probed: loopback, port from ``PORT`` (default 8000)."""
    env = os.environ if environ is None else environ
    port = int(env.get("PORT", "8000"))
    return f"http://127.0.0.1:{port}{LIVE_PATH}"


def is_live(url: str, timeout_s: float = 3.0) -> bool:
    """True when ``url`` answers 200 within ``timeout_s`` (proxies from the environment ignored)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main() -> int:
    try:
        url = live_url()
    except ValueError:
        sys.stderr.write("healthcheck: PORT is not an integer\n")
        return 1
    ok = is_live(url)
    if not ok:
        sys.stderr.write(f"healthcheck: {url} is not live\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
