"""Container health probe: exit 0 when `GET PATH` (default /readyz) on the local service is 200.

Reads the address from the service's own variables, so it follows RESNET_SERVE_PORT. Standard
library only: the images carry no curl.
"""

from __future__ import annotations

import os
import sys
import urllib.request

WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def probe_url(path: str) -> str:
    host = os.environ.get("RESNET_SERVE_HOST", "127.0.0.1")
    host = "127.0.0.1" if host in WILDCARDS else host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    port = os.environ.get("RESNET_SERVE_PORT", "8000")
    return f"http://{host}:{port}{path}"


def main(argv: list[str]) -> int:
    url = probe_url(argv[0] if argv else "/readyz")
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:  # URLError, HTTPError (non-2xx), timeouts, refused connections
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
