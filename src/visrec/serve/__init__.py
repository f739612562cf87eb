"""`visrec serve RUN [RUN...]`: trained runs behind an HTTP API and a web page (FastAPI on uvicorn).

    from visrec.serve import ServeSettings, create_app, serve
    serve(["runs/fmnist"], ServeSettings(port=8000, token="..."))   # blocks; SIGTERM finishes in-flight requests
    app = create_app(["runs/fmnist"])                                # an ASGI app for your own server

See `app.py` for the routes and defenses, `batching.py` for the dynamic batching, `model.py` for what each task
answers.
"""

from __future__ import annotations

import ipaddress
import logging
import sys
from pathlib import Path

from .app import ServeSettings, create_app

log = logging.getLogger("visrec.serve")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(runs: list[str | Path], settings: ServeSettings | None = None, *, log_level: str = "info") -> None:
    """Serve `runs` until SIGINT or SIGTERM; in-flight requests finish first."""
    import uvicorn

    settings = settings or ServeSettings()
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(log_level.upper())
    app = create_app(runs, settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, access_log=False, log_level="warning",
                            timeout_graceful_shutdown=max(5, int(settings.timeout_s) + 5), server_header=False,
                            lifespan="on")
    server = uvicorn.Server(config)

    def stop(message: str) -> None:
        log.error("stopping: %s", message)
        server.should_exit = True

    app.state.server.on_load_error = stop
    where = f"http://{settings.host if ':' not in settings.host else f'[{settings.host}]'}:{settings.port}"
    names = ", ".join(app.state.server.models)
    if is_loopback(settings.host):
        reach = (f"listening on {settings.host} only: other machines cannot reach it (--host 0.0.0.0 opens it to "
                 "the network; add --token)")
    else:
        reach = f"listening on {settings.host}: reachable from the network"
        if not settings.token:
            reach += "; WARNING: without --token anyone who reaches it can use it"
    log.info("visrec serve: %s at %s (web page at /, API at /v1/predict, %s backend, batches of up to %d, "
             "waiting up to %g ms)", names, where, settings.backend, settings.max_batch, settings.max_wait_ms)
    log.info(reach)
    server.run()
    if app.state.server.load_error:
        raise SystemExit(1)


__all__ = ["ServeSettings", "create_app", "is_loopback", "serve"]
