"""The image's HEALTHCHECK: exit 0 when the server in this container reports ready, else 1.

Asks ``GET /v2/health/ready`` (Open Inference Protocol readiness: every model loaded and warmed up) on the
port and address the server listens on, read from the same STAGEFORMER_* variables; the health routes need
no API key. Standard library only, so the check needs no curl in the image.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def ready_url(environ: dict[str, str] | os._Environ[str]) -> str:
    host = environ.get("STAGEFORMER_HOST", "127.0.0.1")
    if host in ("", "0.0.0.0", "::"):  # listening everywhere: loopback reaches it
        host = "127.0.0.1"
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    port = environ.get("STAGEFORMER_PORT", "8000")
    return f"http://{host}:{port}/v2/health/ready"


def main() -> int:
    url = ready_url(os.environ)
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"not ready: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
