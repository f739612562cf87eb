"""The HTTP server: a FastAPI app on uvicorn that answers for one or several run folders.

    GET  /                 the web page (no external resources, strict Content-Security-Policy)
    POST /v1/predict       a raw image body, or multipart/form-data with one or several images
                           ?top_k=5  ?explain=gradcam  ?model=RUN_NAME (default: the first run)
    GET  /v1/models        each run's card: task, classes, input size, preprocessing, test metrics
    GET  /healthz          the process answers          GET /readyz   the models are loaded (503 before)
    GET  /metrics          Prometheus text format       GET /openapi.json   the API's schema

Defenses, in the order a request meets them (`Gate`, a plain ASGI middleware in front of the app): the bearer
token (compared in constant time), a Content-Length above `max_bytes` (refused before any byte of the body is
read), and a byte count while the body streams (refused the moment it passes `max_bytes`). Then the endpoint:
the media type, at most `max_images` images, each recognized by its magic bytes and its header read before any
pixel is decoded (`max_pixels`), and at most `timeout_s` per request. No endpoint reads a path or a URL from the
request, and nothing loads a model over HTTP: the runs are the ones named when the server started.

Errors are JSON `{"error": kind, "detail": what happened, "hint": what to do}` with the fitting status: 400 an
unreadable or unsupported image (or no image), 401 token, 404/405 route, 413 too large (bytes, pixels or images),
415 media type, 422 parameter, 503 loading, 504 timeout.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import VisrecError
from .batching import Batcher, Job
from .model import NotSmall, Prepared, ServedModel, UploadError, sniff

log = logging.getLogger("visrec.serve")
PAGE = Path(__file__).parent / "page"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                    (b"content-security-policy", CSP.encode()), (b"cache-control", b"no-store")]
METHODS = ("GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS")
OPEN_PATHS = ("/", "/healthz", "/readyz", "/openapi.json", "/static/app.js", "/static/style.css")
ROUTES = ("/", "/v1/predict", "/v1/models", "/healthz", "/readyz", "/metrics", "/openapi.json", "/static/app.js",
          "/static/style.css")


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    max_batch: int = 32
    max_wait_ms: float = 5.0
    backend: str = "torch"
    max_bytes: int = 10 * 1024 * 1024
    max_images: int = 16
    max_pixels: int | None = None
    timeout_s: float = 30.0
    tta: str | None = None
    which: str = "auto"
    min_score: float = 0.5

    def check(self) -> None:
        for name, value, low in (("--max-batch", self.max_batch, 1), ("--max-bytes", self.max_bytes, 1),
                                 ("--max-images", self.max_images, 1), ("--port", self.port, 0)):
            if value < low:
                raise VisrecError(f"{name} {value} is too small", f"give {name} >= {low}")
        if self.max_wait_ms < 0 or self.timeout_s <= 0:
            raise VisrecError("--max-wait-ms must be >= 0 and --timeout > 0")
        if self.token is not None and len(self.token) < 8:
            raise VisrecError("--token is shorter than 8 characters", "use a long random token, e.g. "
                              "python -c 'import secrets; print(secrets.token_urlsafe(24))'")


class ApiError(Exception):
    def __init__(self, status: int, kind: str, detail: str, hint: str = "", headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.kind, self.detail, self.hint, self.headers = status, kind, detail, hint, headers


class BodyTooLarge(Exception):
    pass


def error_body(kind: str, detail: str, hint: str = "") -> dict[str, str]:
    return {"error": kind, "detail": detail, "hint": hint}


class Metrics:
    """Prometheus counters and histograms of one server (its own registry: two servers in one process don't mix)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("visrec_requests", "HTTP requests answered", ["method", "path", "status"],
                                registry=self.registry)
        self.errors = Counter("visrec_errors", "Requests answered with an error, by kind", ["kind"],
                              registry=self.registry)
        self.latency = Histogram("visrec_request_seconds", "Request latency (seconds)", ["path"],
                                 buckets=(.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30),
                                 registry=self.registry)
        self.batch = Histogram("visrec_batch_size", "Images per forward pass", ["model"],
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.images = Counter("visrec_images", "Images predicted", ["model"], registry=self.registry)
        self.in_flight = Gauge("visrec_in_flight", "Prediction requests being answered", registry=self.registry)
        self._children: dict[tuple, Any] = {}

    def child(self, metric, *labels: str):
        """metric.labels(*labels), remembered: the lookup takes a lock and builds a key on every call."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


def served_name(ref: str | Path) -> tuple[str | None, str | Path]:
    """(name, run folder) of a served run: `NAME=PATH` names it for the API (`?model=NAME`), a plain path is named
    after its folder (None here). A path that exists is never split, even with a `=` in it."""
    text = str(ref)
    name, sep, path = text.partition("=")
    if not sep or Path(text).exists():
        return None, ref
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise VisrecError(f"served run name {name!r} (in {text!r}) is not valid",
                          "use letters, digits, '.', '_' and '-', starting with a letter or digit: NAME=runs/FOLDER")
    return name, path


class Server:
    """The models, their batchers and the settings: what the app's endpoints share."""

    def __init__(self, runs: list[str | Path], settings: ServeSettings):
        settings.check()
        if not runs:
            raise VisrecError("no run folder to serve", "visrec serve runs/<name> [runs/<other> ...]")
        self.settings = settings
        self.models: dict[str, ServedModel] = {}
        for r in runs:
            name, path = served_name(r)
            m = ServedModel(path, backend=settings.backend, which=settings.which, tta=settings.tta,
                            max_pixels=settings.max_pixels, min_score=settings.min_score)
            m.name = name or m.name
            if m.name in self.models:
                raise VisrecError(f"two runs are named {m.name}",
                                  f"name them for the API: visrec serve {m.name}={self.models[m.name].run.path} "
                                  f"other={path}")
            self.models[m.name] = m
        self.batchers: dict[str, Batcher] = {}
        self.metrics = Metrics()
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.on_load_error = None  # called with the message when loading fails (the CLI stops the server)
        self.fast_routes: dict[str, tuple[str, Any]] = {}  # path -> (method, handler): answered by Gate itself

    def load(self) -> None:
        """Load every model (in a thread, while the server already answers /healthz and /readyz)."""
        try:
            for name, m in self.models.items():
                t0 = time.perf_counter()
                m.load()
                self.batchers[name] = Batcher(lambda jobs, m=m: self._run_batch(m, jobs),
                                              max_batch=self.settings.max_batch, max_wait_ms=self.settings.max_wait_ms,
                                              name=name, on_batch=self.metrics.batch.labels(name).observe)
                log.info("loaded %s (%s, %s backend, %d classes) in %.1f s", name, m.task, m.backend_name,
                         len(m.classes), time.perf_counter() - t0)
            self.ready.set()
        except Exception as e:  # noqa: BLE001 - reported by /readyz and the log, and the CLI exits
            self.load_error = f"{type(e).__name__}: {e}" if not isinstance(e, VisrecError) else str(e)
            log.error("cannot load the models: %s", self.load_error)
            if self.on_load_error is not None:
                self.on_load_error(self.load_error)

    def stop(self) -> None:
        for b in self.batchers.values():
            b.stop()

    @staticmethod
    def _run_batch(m: ServedModel, jobs: list[Job]) -> list[list[dict[str, Any]]]:
        items: list[Prepared] = [p for j in jobs for p in j.items]
        ks = [int(j.options.get("top_k", 5)) for j in jobs for _ in j.items]
        answers = m.infer(items, ks)
        want = [i for i, j in enumerate(jobs) for _ in j.items if j.options.get("explain")]
        if want:
            targets = [m.classes.index(answers[i]["top"][0]["class"]) for i in want]
            for i, uri in zip(want, m.explain([items[i] for i in want], targets), strict=True):
                answers[i]["gradcam"] = uri
        out, at = [], 0
        for j in jobs:
            out.append(answers[at:at + len(j.items)])
            at += len(j.items)
        return out


# ------------------------------------------------------------------------------------------------ middleware


class Gate:
    """Token, body size, security headers, one log line and the metrics of every request."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s = self.server.settings
        t0 = time.perf_counter()
        path, method = scope["path"], scope["method"]
        auth, length = "", None
        for k, v in scope["headers"]:  # the two headers the gate reads (names arrive lower-cased)
            if k == b"authorization":
                auth = v.decode("latin-1")
            elif k == b"content-length":
                length = v.decode("latin-1")
        state = scope.setdefault("state", {})
        sent = {"status": 0, "started": False}
        counted = path == "/v1/predict"
        if counted:
            self.server.metrics.in_flight.inc()

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                sent["status"], sent["started"] = message["status"], True
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        async def refuse(status: int, kind: str, detail: str, hint: str, extra: list | None = None):
            state["error"] = kind
            body = JSONResponse(error_body(kind, detail, hint), status_code=status)
            body.raw_headers.extend(extra or [])
            await body(scope, receive, send_wrapped)

        try:
            if s.token and path not in OPEN_PATHS and not self._authorized(auth):
                return await refuse(401, "unauthorized", "this server needs a bearer token, and the request's "
                                    "is missing or wrong", "send the header Authorization: Bearer <token>",
                                    [(b"www-authenticate", b'Bearer realm="visrec"')])
            if length is not None:
                if not length.isdigit():
                    return await refuse(400, "bad_request", f"Content-Length {length!r} is not a number", "")
                if int(length) > s.max_bytes:
                    return await refuse(413, "too_large", f"the request body is {int(length):,} bytes, above the "
                                        f"server's limit of {s.max_bytes:,}", "send smaller images, fewer at a "
                                        "time, or start the server with a larger --max-bytes")
            seen = 0

            async def receive_counted():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > s.max_bytes:
                        raise BodyTooLarge
                return message

            try:
                route = self.server.fast_routes.get(path)
                if route is None:
                    await self.app(scope, receive_counted, send_wrapped)
                elif method != route[0]:
                    return await refuse(405, "method_not_allowed", f"{method} {path} is not a route; use {route[0]}",
                                        "", [(b"allow", route[0].encode())])
                else:
                    await self._fast(route[1], scope, receive_counted, send_wrapped, state)
            except BodyTooLarge:
                if sent["started"]:
                    raise
                return await refuse(413, "too_large", f"the request body passed the server's limit of "
                                    f"{s.max_bytes:,} bytes while streaming", "send smaller images, fewer at a "
                                    "time, or start the server with a larger --max-bytes")
        finally:
            if counted:
                self.server.metrics.in_flight.dec()
            self._record(scope, method, path, sent["status"] or 500, time.perf_counter() - t0, state)

    @staticmethod
    async def _fast(handler, scope, receive, send, state: dict) -> None:
        """A hot route answered here, without the framework's routing, dependency solving and serialization: under
        load those took a third of the event loop's time per prediction. Other errors go on to the app's handler."""
        try:
            response = await handler(Request(scope, receive))
        except ApiError as e:
            state["error"] = e.kind
            response = JSONResponse(error_body(e.kind, e.detail, e.hint), status_code=e.status, headers=e.headers)
        await response(scope, receive, send)

    def _authorized(self, header: str) -> bool:
        scheme, _, given = header.partition(" ")
        token = self.server.settings.token or ""
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())

    def _record(self, scope, method: str, path: str, status: int, seconds: float, state: dict) -> None:
        m = self.server.metrics
        route = path if path in ROUTES else "other"
        m.child(m.requests, method if method in METHODS else "other", route, str(status)).inc()
        m.child(m.latency, route).observe(seconds)
        if status >= 400:
            m.child(m.errors, state.get("error") or f"http_{status}").inc()
        client = scope.get("client") or ("-", 0)
        n = state.get("images")
        shown = "".join(ch if ch.isprintable() else "?" for ch in path[:200])  # a decoded %0A must not forge a line
        log.info("%s %s %s %d %.1f ms%s", client[0], method[:16], shown, status, seconds * 1000,
                 f" {n} image{'s' if n != 1 else ''}" if n is not None else "")


# ------------------------------------------------------------------------------------------------ the app


def create_app(runs: list[str | Path], settings: ServeSettings | None = None) -> FastAPI:
    """The server's app for `runs` (run folders). Models load when the app starts (in a thread, so /readyz says
    503 until they are ready)."""
    server = Server(runs, settings or ServeSettings())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=server.load, name="visrec-loader", daemon=True).start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(server.stop)
            log.info("shut down: requests in flight were answered")

    app = FastAPI(title="visrec", summary="Predictions of trained visrec runs", version=_version(),
                  lifespan=lifespan, docs_url=None, redoc_url=None)  # the docs pages load scripts from a CDN
    app.state.server = server
    app.add_middleware(Gate, server=server)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        request.state.error = e.kind
        return JSONResponse(error_body(e.kind, e.detail, e.hint), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_parameter(request: Request, e: RequestValidationError):
        request.state.error = "bad_parameter"
        parts = [f"{'.'.join(str(x) for x in err.get('loc', ())[1:]) or 'request'}: {err.get('msg')}"
                 + (f" (got {err['input']!r})" if "input" in err and err["input"] is not None else "")
                 for err in e.errors()]
        return JSONResponse(error_body("bad_parameter", "; ".join(parts), "see GET /openapi.json for the "
                                       "parameters"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, f"http_{e.status_code}")
        request.state.error = kind
        hint = "the routes are /, /v1/predict, /v1/models, /healthz, /readyz and /metrics" if e.status_code in (
            404, 405) else ""
        return JSONResponse(error_body(kind, str(e.detail), hint), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal", f"{type(e).__name__}: {e}", "this is a bug in the server; the "
                                       "log has the traceback"), status_code=500)

    # -------------------------------------------------------------------------------------------- pages

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> Response:
        return Response((PAGE / "index.html").read_bytes(), media_type="text/html; charset=utf-8")

    @app.get("/static/app.js", include_in_schema=False)
    async def script() -> Response:
        return Response((PAGE / "app.js").read_bytes(), media_type="text/javascript; charset=utf-8")

    @app.get("/static/style.css", include_in_schema=False)
    async def style() -> Response:
        return Response((PAGE / "style.css").read_bytes(), media_type="text/css; charset=utf-8")

    # -------------------------------------------------------------------------------------------- status

    @app.get("/healthz", summary="The process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="The models are loaded and answer")
    async def readyz() -> dict[str, Any]:
        _check_ready(server)
        return {"status": "ready", "models": list(server.models)}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", summary="The served runs: task, classes, input, preprocessing, test metrics")
    async def models() -> dict[str, Any]:
        return {"ready": server.ready.is_set(), "models": [m.card() for m in server.models.values()],
                "limits": {"max_bytes": server.settings.max_bytes, "max_images": server.settings.max_images,
                           "max_batch": server.settings.max_batch, "timeout_s": server.settings.timeout_s}}

    # -------------------------------------------------------------------------------------------- predict

    async def predict(request: Request) -> JSONResponse:
        """POST /v1/predict, answered by Gate directly (see Gate._fast); `openapi()` documents it."""
        top_k, explain, model = _predict_params(request)
        t0 = time.perf_counter()
        s = server.settings
        m = _pick_model(server, model)
        if explain and not m.explainable:
            raise ApiError(422, "bad_parameter", f"explain=gradcam is not offered for {m.name}, a {m.task} run"
                           + ("" if m.kind.Predictor.explanations else " (its task has no attribution method)"),
                           "leave out explain" + (", or serve it with --backend torch"
                                                  if m.kind.Predictor.explanations else ""))
        _check_ready(server)
        batcher = server.batchers[m.name]
        try:
            with batcher.expecting() as ticket:
                uploads = await _read_images(request, s.max_images)
                request.state.images = len(uploads)
                prepared = await _prepare(m, uploads)
                answers = await batcher.submit(prepared, ticket, timeout=s.timeout_s, top_k=top_k,
                                               explain=bool(explain))
        except UploadError as e:
            raise ApiError(e.status, e.kind, e.detail, e.hint or "") from None
        except TimeoutError:
            raise ApiError(504, "timeout", f"no answer within {s.timeout_s:g} s (the server is overloaded)",
                           "retry later, or send fewer images per request") from None
        except RuntimeError as e:
            raise ApiError(503, "shutting_down", str(e), "retry on another instance") from None
        except VisrecError as e:
            raise ApiError(400, "cannot_predict", e.message, e.hint or "") from None
        server.metrics.images.labels(m.name).inc(len(prepared))
        results = [{"image": p.name, "format": p.fmt, "width": p.width, "height": p.height, **a}
                   for p, a in zip(prepared, answers, strict=True)]
        return JSONResponse({"model": m.name, "task": m.task, "results": results,
                             "ms": round((time.perf_counter() - t0) * 1000, 2)})

    server.fast_routes["/v1/predict"] = ("POST", predict)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            schema["paths"]["/v1/predict"] = PREDICT_SCHEMA
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


INLINE_PIXELS = 256 * 256  # uploads this small decode on the event loop (tens of microseconds: less than a thread
# hop); a larger one decodes in the thread pool, so a big photo never blocks the loop


async def _prepare(m: ServedModel, uploads: list[tuple[str, bytes]]) -> list[Prepared]:
    try:
        return [m.prepare(data, name, inline_pixels=INLINE_PIXELS) for name, data in uploads]
    except NotSmall:
        return await anyio.to_thread.run_sync(lambda: [m.prepare(data, name) for name, data in uploads])


PREDICT_PARAMETERS: list[dict[str, Any]] = [
    {"name": "top_k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 1000,
                                                                   "default": 5},
     "description": "How many classes per image (classification, localization); more than the run has gives all."},
    {"name": "explain", "in": "query", "required": False, "schema": {"type": "string", "enum": ["gradcam"]},
     "description": "gradcam: add a Grad-CAM heat map (PNG data URI) for the top class."},
    {"name": "model", "in": "query", "required": False, "schema": {"type": "string", "maxLength": 200},
     "description": "The run's name (GET /v1/models); default: the first."},
]


PREDICT_SCHEMA = {"post": {
    "summary": "Predict one or several images",
    "description": "The body is one image (any Content-Type image/* or application/octet-stream; the format is "
                   "recognized by its bytes) or multipart/form-data with one or several image files. The answer: "
                   "{model, task, results: [{image, format, width, height, top | box | objects | pixels, mask?, "
                   "gradcam?}], ms}; errors: {error, detail, hint}.",
    "operationId": "predict",
    "parameters": PREDICT_PARAMETERS,
    "requestBody": {"required": True, "content": {
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}},
    "responses": {str(code): {"description": text, "content": {"application/json": {"schema": {"type": "object"}}}}
                  for code, text in ((200, "the predictions"), (400, "unreadable or unsupported image, or none"),
                                     (401, "token missing or wrong"), (413, "too many bytes, pixels or images"),
                                     (415, "not an image or a form"), (422, "bad parameter"), (503, "loading"),
                                     (504, "timeout"))},
}}


def _predict_params(request: Request) -> tuple[int, str | None, str | None]:
    q = request.query_params
    unknown = sorted(set(q) - {"top_k", "explain", "model"})
    if unknown:
        raise ApiError(422, "bad_parameter", f"unknown parameter {unknown[0]!r}", "the parameters are top_k, "
                       "explain and model (GET /openapi.json)")
    text = q.get("top_k", "5")
    if not (text.isdigit() and 1 <= int(text) <= 1000):
        raise ApiError(422, "bad_parameter", f"top_k: {text!r} is not a whole number from 1 to 1000",
                       "e.g. ?top_k=5")
    explain = q.get("explain")
    if explain not in (None, "gradcam"):
        raise ApiError(422, "bad_parameter", f"explain: {explain[:50]!r} is not a method the server offers",
                       "use ?explain=gradcam, or leave it out")
    model = q.get("model")
    if model is not None and len(model) > 200:
        raise ApiError(422, "bad_parameter", "model: the name is longer than 200 characters",
                       "give a run's name from GET /v1/models")
    return int(text), explain, model


def _check_ready(server: Server) -> None:
    if server.load_error:
        raise ApiError(503, "load_failed", f"the models could not be loaded: {server.load_error}",
                       "see the server's log; fix the run folder and restart")
    if not server.ready.is_set():
        raise ApiError(503, "loading", "the models are still loading", "retry in a second",
                       headers={"Retry-After": "1"})


def _pick_model(server: Server, name: str | None) -> ServedModel:
    if name is None:
        return next(iter(server.models.values()))
    if name not in server.models:
        raise ApiError(422, "unknown_model", f"no served run is named {name!r}",
                       f"use one of: {', '.join(server.models)} (GET /v1/models)")
    return server.models[name]


async def _read_images(request: Request, max_images: int) -> list[tuple[str, bytes]]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images, max_fields=max_images + 8)
        except StarletteHTTPException as e:
            if "too many files" in str(e.detail).lower():
                raise ApiError(413, "too_many_images", f"the form holds more than {max_images} files",
                               f"send at most {max_images} images per request") from None
            raise ApiError(400, "bad_multipart", f"the multipart body cannot be parsed: {e.detail}",
                           "send multipart/form-data with image files") from None
        try:
            files = [(i, v) for i, (_, v) in enumerate(form.multi_items()) if isinstance(v, UploadFile)]
            if not files:
                raise ApiError(400, "no_image", "the form holds no file", "attach one or several image files "
                               "(e.g. curl -F images=@photo.jpg)")
            out = []
            for i, f in files:
                data = await f.read()
                if not data:
                    raise ApiError(400, "no_image", f"file {_safe_name(f.filename, i)} of the form is empty",
                                   "attach the image's bytes")
                out.append((_safe_name(f.filename, i), data))
            return out
        finally:
            await form.close()
    # curl --data-binary @FILE says form-urlencoded unless told otherwise: a body whose first bytes are an image's
    # is that image (a real form's `key=value` text never starts with an image's magic bytes)
    curl_default = ctype == "application/x-www-form-urlencoded"
    if ctype and ctype != "application/octet-stream" and not ctype.startswith("image/") and not curl_default:
        raise ApiError(415, "unsupported_media_type", f"Content-Type {ctype} is not an image upload",
                       "send the image's bytes as the body (Content-Type image/... or application/octet-stream), "
                       "or multipart/form-data with image files")
    body = await request.body()
    if not body:
        raise ApiError(400, "no_image", "the request has no body", "send the image's bytes as the body")
    if curl_default and sniff(body) is None:
        raise ApiError(415, "unsupported_media_type", f"Content-Type {ctype} with a body that is not an image",
                       "send the image's bytes as the body (curl --data-binary @FILE), or multipart/form-data with "
                       "image files (curl -F images=@FILE)")
    return [(_safe_name(request.headers.get("x-filename"), 0, "body"), body)]


def _safe_name(name: str | None, i: int, default: str = "") -> str:
    """A client's file name, only ever echoed back (never opened): printable, at most 120 characters."""
    text = "".join(ch for ch in (name or "") if ch.isprintable())[-120:]
    return text or default or f"image {i + 1}"


def _version() -> str:
    from ..version import __version__

    return __version__
