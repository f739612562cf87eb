"""`visrec serve`: a real uvicorn server in its own process, spoken to over sockets, and its page in headless Chromium.

One tiny classification run serves every test; the server runs with a token and small limits so each defense can
be reached cheaply."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import pytest
from PIL import Image

import visrec
from visrec.data.images import peek
from visrec.errors import VisrecError
from visrec.serve.batching import Batcher
from visrec.serve.model import ServedModel, sniff

SYN = "synthetic:classes=4,size=16,train=256,test=64"
TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BYTES = 2_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`visrec serve ...` in a subprocess; its log in a file."""

    def __init__(self, args: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "visrec", "serve", *args, "--port", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not get ready:\n{log.read_text()}")
            time.sleep(0.2)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "tiny"
    return visrec.train(SYN, epochs=2, out=str(out), progress=False,
                        overrides={"train.batch_size": 32, "model.kwargs.widths": [8, 16, 16], "log.report": False})


@pytest.fixture(scope="module")
def images(run, tmp_path_factory) -> list[Path]:
    """Test images of the run's own data, as PNG files."""
    from visrec.runs import dataset_from_config

    ds = dataset_from_config(run.config)
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(8):
        a = ds.test.images[i].permute(1, 2, 0).numpy()
        p = folder / f"test{i}.png"
        Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    s = ServerProcess([str(run.path), "--token", TOKEN, "--max-images", "4", "--max-bytes", str(MAX_BYTES)],
                      tmp_path_factory.mktemp("log") / "server.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        yield c


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def error_of(response: httpx.Response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail", "hint"} and body["error"] == kind, body
    return body


# ------------------------------------------------------------------------------------------------ API contract


def test_status_routes_and_model_card(client, run):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    card = client.get("/v1/models").json()["models"][0]
    assert card["name"] == run.name and card["task"] == "classification" and card["ready"]
    assert card["classes"] == run.load_model().classes and card["input"]["height"] == 16
    assert card["preprocessing"]["normalize"]["mode"] == "channel" and "acc" in card["test_metrics"]
    schema = client.get("/openapi.json").json()
    assert "/v1/predict" in schema["paths"] and "top_k" in str(schema["paths"]["/v1/predict"])
    assert client.get("/docs").status_code == 404  # FastAPI's docs page loads scripts from a CDN: off


def test_predict_raw_and_multipart_agree_with_the_library(client, run, images):
    want = [p.top[:3] for p in run.predict([str(p) for p in images[:2]], top_k=3)]
    raw = client.post("/v1/predict?top_k=3", content=png_bytes(images[0]), headers={"Content-Type": "image/png"})
    assert raw.status_code == 200, raw.text
    r = raw.json()["results"][0]
    assert r["format"] == "PNG" and (r["width"], r["height"]) == (16, 16)
    assert [t["class"] for t in r["top"]] == [c for c, _ in want[0]]
    assert r["top"][0]["prob"] == pytest.approx(want[0][0][1], abs=1e-4)
    multi = client.post("/v1/predict?top_k=3", files=[("images", (p.name, png_bytes(p), "image/png"))
                                                      for p in images[:2]]).json()
    assert [x["image"] for x in multi["results"]] == ["test0.png", "test1.png"]
    assert [[t["class"] for t in x["top"]] for x in multi["results"]] == [[c for c, _ in w] for w in want]


def test_gradcam_comes_back_as_a_png_data_uri(client, images):
    r = client.post("/v1/predict?explain=gradcam&top_k=1", content=png_bytes(images[0])).json()["results"][0]
    assert r["gradcam"].startswith("data:image/png;base64,")
    heat = Image.open(io.BytesIO(base64.b64decode(r["gradcam"].split(",", 1)[1])))
    assert heat.mode == "RGBA" and heat.size == (16, 16)


def test_errors_have_the_right_status_and_a_json_body(client, images, tmp_path):
    error_of(client.post("/v1/predict", content=b"just some text\n", headers={"Content-Type": "image/png"}),
             400, "unsupported_image")  # a text file named .png: the bytes decide, not the name or the type
    error_of(client.post("/v1/predict", files=[("images", ("notes.png", b"hello\n", "image/png"))]),
             400, "unsupported_image")
    buf = io.BytesIO()
    Image.open(images[0]).convert("RGB").resize((64, 64)).save(buf, format="JPEG", quality=90)
    body = error_of(client.post("/v1/predict", content=buf.getvalue()[: len(buf.getvalue()) // 2]), 400,
                    "unreadable_image")
    assert "JPEG" in body["detail"]
    form = b'--b0\r\nContent-Disposition: form-data; name="note"\r\n\r\nno file here\r\n--b0--\r\n'
    error_of(client.post("/v1/predict", content=form, headers={"Content-Type": "multipart/form-data; boundary=b0"}),
             400, "no_image")  # multipart with zero files
    error_of(client.post("/v1/predict", files={"x": ("", b"", "text/plain")}), 400, "no_image")
    error_of(client.post("/v1/predict", content=b""), 400, "no_image")
    error_of(client.post("/v1/predict", content=b"{}", headers={"Content-Type": "application/json"}), 415,
             "unsupported_media_type")
    # curl --data-binary's default Content-Type: an image's bytes are taken as the image, anything else refused
    ok = client.post("/v1/predict", content=png_bytes(images[0]),
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert ok.status_code == 200 and ok.json()["results"][0]["format"] == "PNG"
    body = error_of(client.post("/v1/predict", content=b"a=1&b=2",
                                headers={"Content-Type": "application/x-www-form-urlencoded"}), 415,
                    "unsupported_media_type")
    assert "curl --data-binary @FILE" in body["hint"]
    error_of(client.post("/v1/predict?top_k=0", content=png_bytes(images[0])), 422, "bad_parameter")
    error_of(client.post("/v1/predict?explain=lime", content=png_bytes(images[0])), 422, "bad_parameter")
    error_of(client.post("/v1/predict?model=../../etc/passwd", content=png_bytes(images[0])), 422, "unknown_model")
    five = [("images", (p.name, png_bytes(p), "image/png")) for p in images[:5]]
    error_of(client.post("/v1/predict", files=five), 413, "too_many_images")
    error_of(client.get("/nothing/here"), 404, "not_found")
    error_of(client.get("/v1/predict"), 405, "method_not_allowed")


def test_every_curl_line_of_the_readme_works_as_written(server, images, tmp_path):
    """The README's curl lines, run by curl itself against a running server (its address and token put in)."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [ln.strip() for ln in readme.splitlines() if ln.strip().startswith("curl ")]
    assert len(lines) >= 2
    for name in {f for ln in lines for f in re.findall(r"@([\w.-]+)", ln)}:  # the files they send
        im = Image.open(images[0]).convert("RGB")
        im.save(tmp_path / name, format="JPEG" if name.endswith((".jpg", ".jpeg")) else "PNG")
    for line in lines:
        line = re.sub(r"(localhost|127\.0\.0\.1):\d+", f"127.0.0.1:{server.port}", line)
        args = shlex.split(line.split(" #")[0])
        args[1:1] = ["-H", f"Authorization: Bearer {TOKEN}"]
        done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (line, done.stderr)
        body = json.loads(done.stdout)
        assert "results" in body and all("top" in r for r in body["results"]), (line, body)
    head = subprocess.run(["curl", "-sI", server.url + "/"], capture_output=True, text=True, timeout=30)
    assert head.stdout.startswith("HTTP/1.1 200"), head.stdout  # curl -I, a HEAD request, finds the page


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny (wrong) body: a decompression bomb's signature."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_a_huge_image_header_is_refused_before_decoding(client):
    bomb = png_header_only(40000, 40000)
    assert sniff(bomb) == "PNG" and len(bomb) < 200
    body = error_of(client.post("/v1/predict", content=bomb), 413, "too_many_pixels")
    assert "1,600,000,000 pixels" in body["detail"]
    small = png_header_only(12000, 12000)  # above the default limit, below Pillow's own bomb guard: size named
    with pytest.raises(VisrecError, match="12000x12000 = 144,000,000 pixels"):
        peek(io.BytesIO(small), name="small.png")


def _raw_request(port: int, head: bytes, chunks, timeout: float = 20.0) -> tuple[bytes, int]:
    """Send `head`, then body chunks until the server answers or closes; (response bytes, body bytes sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        for c in chunks:
            try:
                s.sendall(c)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(c)
            s.settimeout(0)
            try:
                early = s.recv(65536)
            except BlockingIOError:
                early = b""
            finally:
                s.settimeout(timeout)
            if early:
                return _read_rest(s, early), sent
        return _read_rest(s, b""), sent


def _read_rest(s: socket.socket, data: bytes) -> bytes:
    """Read until the JSON body of the response is complete (its Content-Length), the server closes, or timeout."""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while True:
            head, sep, body = data.partition(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(
                b"content-length:")]
            if sep and length and len(body) >= length[0]:
                break
            part = s.recv(65536)
            if not part:
                break
            data += part
    return data


def test_a_12mb_body_is_refused_before_it_is_read(server):
    size = 12 * 1024 * 1024
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {size}\r\n\r\n").encode()
    response, sent = _raw_request(server.port, head, (b"\0" * 65536 for _ in range(size // 65536)))
    assert response.startswith(b"HTTP/1.1 413") and b'"too_large"' in response
    assert sent < size  # answered from the Content-Length, long before the body was all sent


def test_a_streamed_body_is_cut_off_at_the_limit(server):
    """Without Content-Length (chunked), the server counts bytes as they arrive and stops at --max-bytes."""
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    piece = 256 * 1024
    chunks = (f"{piece:x}\r\n".encode() + b"\0" * piece + b"\r\n" for _ in range(48))  # 12 MB offered
    response, sent = _raw_request(server.port, head, chunks)
    assert response.startswith(b"HTTP/1.1 413") and b"while streaming" in response
    assert sent < 12 * 1024 * 1024


def test_the_token_guards_the_api_but_not_the_health_checks(server, images):
    with httpx.Client(base_url=server.url, timeout=30) as anon:
        error_of(anon.post("/v1/predict", content=png_bytes(images[0])), 401, "unauthorized")
        wrong = anon.post("/v1/predict", content=png_bytes(images[0]), headers={"Authorization": "Bearer nope"})
        assert error_of(wrong, 401, "unauthorized") and wrong.headers["www-authenticate"].startswith("Bearer")
        error_of(anon.get("/v1/models"), 401, "unauthorized")
        error_of(anon.get("/metrics"), 401, "unauthorized")
        assert anon.get("/healthz").status_code == 200 and anon.get("/readyz").status_code == 200
        page = anon.get("/")
        assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"


def test_50_concurrent_requests_answer_as_one_by_one(server, client, images):
    one_by_one = [client.post("/v1/predict?top_k=2", content=png_bytes(p)).json()["results"][0]["top"]
                  for p in images]

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as c:
            return await asyncio.gather(*[c.post("/v1/predict?top_k=2", content=png_bytes(images[i % len(images)]))
                                          for i in range(50)])

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    for i, r in enumerate(responses):
        got, want = r.json()["results"][0]["top"], one_by_one[i % len(images)]
        assert [t["class"] for t in got] == [t["class"] for t in want]
        assert [t["prob"] for t in got] == pytest.approx([t["prob"] for t in want], abs=1e-5)
    metrics = client.get("/metrics").text
    assert "visrec_batch_size_count" in metrics and 'visrec_errors_total{kind="too_many_images"}' in metrics


def test_every_request_is_logged_in_one_line_without_content(server, client, images):
    client.post("/v1/predict?top_k=1", content=png_bytes(images[0]), headers={"X-Filename": "secret-name.png"})
    client.get("/x%0A2026-01-01 00:00:00 127.0.0.1 POST /v1/predict 200 forged")  # a newline in the path
    time.sleep(0.2)
    assert not any(ln.endswith("forged") for ln in server.log.read_text().splitlines())
    lines = [ln for ln in server.log.read_text().splitlines() if "POST /v1/predict 200" in ln and "/x?" not in ln]
    assert lines and lines[-1].endswith("1 image") and " ms " in lines[-1]
    assert "secret-name" not in server.log.read_text() and "listening on 127.0.0.1 only" in server.log.read_text()


def test_sigterm_lets_the_request_in_flight_finish(run, images, tmp_path):
    s = ServerProcess([str(run.path)], tmp_path / "server.log")
    body = png_bytes(images[0])
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", s.port), timeout=30) as conn:
        conn.sendall(head + body[:20])  # half a request: the server is now waiting for the rest of the body
        deadline = time.monotonic() + 30
        while "visrec_in_flight 1.0" not in httpx.get(s.url + "/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # shutdown has begun: new connections are refused from here on
        conn.sendall(body[20:])
        response = _read_rest(conn, b"")
    assert response.startswith(b"HTTP/1.1 200") and b'"top"' in response
    assert s.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it caught once it has shut down
    assert "shut down" in s.log.read_text()


# ------------------------------------------------------------------------------------------------ in-process parts


def test_batcher_joins_waiting_requests_and_fails_only_the_bad_one():
    gate = threading.Event()
    seen: list[list[int]] = []

    def run_batch(jobs):
        seen.append([len(j.items) for j in jobs])
        if len(seen) == 1:
            gate.wait(10)  # the first batch blocks while the others queue up
        if any("bad" in j.items for j in jobs):
            raise ValueError("a bad input")
        return [[x * 2 for x in j.items] for j in jobs]

    b = Batcher(run_batch, max_batch=8, max_wait_ms=0)

    async def main():
        first = asyncio.ensure_future(b.submit([1]))
        while not seen:
            await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(b.submit(items)) for items in ([2, 3], ["bad"], [4], [5, 6, 7, 8, 9])]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    out = asyncio.run(main())
    b.stop()
    assert out[0] == [2] and out[1] == [4, 6] and out[3] == [8] and out[4] == [10, 12, 14, 16, 18]
    assert isinstance(out[2], ValueError)
    # the first job ran alone; the three small jobs that waited meanwhile joined one batch (4 images) and the big
    # one (5 more would pass max_batch 8) waited for the next; the failed batch was retried job by job
    assert seen == [[1], [2, 1, 1], [2], [1], [1], [5]]


def test_a_request_past_its_timeout_gets_timeout_and_its_job_is_skipped():
    gate = threading.Event()
    ran: list[list] = []

    def run_batch(jobs):
        ran.append([j.items for j in jobs])
        gate.wait(10)
        return [j.items for j in jobs]

    b = Batcher(run_batch, max_batch=4, max_wait_ms=0)

    async def main():
        first = asyncio.ensure_future(b.submit(["slow"]))
        while not ran:
            await asyncio.sleep(0.01)
        with pytest.raises(TimeoutError):
            await b.submit(["late"], timeout=0.05)  # the worker is busy with "slow"
        gate.set()
        return await first, await b.submit(["next"], timeout=5)

    assert asyncio.run(main()) == (["slow"], ["next"])
    b.stop()
    assert ran == [[["slow"]], [["next"]]]  # "late" gave up before its turn and never ran


def test_onnx_backend_answers_like_torch(run, images):
    torch_model = ServedModel(run.path, backend="torch").load()
    onnx_model = ServedModel(run.path, backend="onnx").load()
    items = [torch_model.prepare(p.read_bytes(), p.name) for p in images]
    a, b = torch_model.infer(items, 3), onnx_model.infer(items, 3)
    for x, y in zip(a, b, strict=True):
        assert [t["class"] for t in x["top"]] == [t["class"] for t in y["top"]]
        assert [t["prob"] for t in x["top"]] == pytest.approx([t["prob"] for t in y["top"]], abs=1e-4)
    assert (run.path / "export").is_dir() and ServedModel(run.path, backend="onnx").load().predictor.backend == "onnx"


def test_uploads_in_many_formats_decode_like_training(run):
    import numpy as np

    m = ServedModel(run.path).load()
    rgb = Image.fromarray((np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8))
    exif = Image.Exif()
    exif[274] = 6  # "rotate 90": the photo is upright once the orientation is applied

    def encoded(im, fmt, **kw) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        return buf.getvalue()

    uploads = {"JPEG": encoded(rgb.convert("CMYK"), "JPEG"), "PNG": encoded(rgb.convert("RGBA"), "PNG"),
               "GIF": encoded(rgb.convert("P"), "GIF"), "WEBP": encoded(rgb, "WEBP"), "BMP": encoded(rgb, "BMP"),
               "TIFF": encoded(rgb, "TIFF"), "PPM/PGM/PBM": encoded(rgb, "PPM")}
    for fmt, data in uploads.items():
        p = m.prepare(data, fmt)
        assert (p.fmt, p.width, p.height) == (fmt, 40, 30) and tuple(p.x.shape) == (m.channels, 16, 16), fmt
    rotated = m.prepare(encoded(rgb, "JPEG", exif=exif.tobytes()), "rotated.jpg")
    assert (rotated.width, rotated.height) == (30, 40)
    sixteen = Image.fromarray((np.arange(30 * 40).reshape(30, 40) * 50).astype(np.uint16))
    mean = m.prepare(encoded(sixteen, "PNG"), "16-bit").x.float().mean()
    assert 90 < mean < 150  # 0..59950 of 65535 scaled to 0..233 (clipping at 255 would give about 254)
    assert len(m.infer([m.prepare(d, f) for f, d in uploads.items()], 3)) == len(uploads)


def test_serve_refuses_bad_settings_and_folders(run, tmp_path):
    with pytest.raises(VisrecError, match="not a visrec run folder"):
        ServedModel(tmp_path)
    with pytest.raises(VisrecError, match="--backend"):
        ServedModel(run.path, backend="tensorrt")
    r = subprocess.run([sys.executable, "-m", "visrec", "serve", str(run.path), "--token", "short"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--token is shorter" in r.stderr


def test_two_runs_of_one_folder_name_are_served_under_names_of_their_own(run, tmp_path, images):
    import shutil

    from visrec.serve.app import Server, ServeSettings, served_name

    twin = tmp_path / "twin" / run.path.name
    shutil.copytree(run.path, twin)
    with pytest.raises(VisrecError, match=f"name them for the API: visrec serve {run.path.name}="):
        Server([run.path, twin], ServeSettings())
    s = ServerProcess([f"prod={run.path}", f"next={twin}"], tmp_path / "named.log")
    try:
        assert [m["name"] for m in httpx.get(s.url + "/v1/models").json()["models"]] == ["prod", "next"]
        r = httpx.post(s.url + "/v1/predict?model=next", content=png_bytes(images[0]), timeout=30)
        assert r.status_code == 200 and r.json()["model"] == "next"
    finally:
        s.stop()
    assert served_name(run.path) == (None, run.path)
    with pytest.raises(VisrecError, match="not valid"):
        served_name(f"../x={run.path}")


def test_a_segmentation_run_answers_with_a_mask(tmp_path):
    from visrec.data.scenes import generate_scenes

    scenes = generate_scenes("scenes:digits", count=24, size=32, max_objects=2, seed=0, out=tmp_path / "coco")
    seg = visrec.train(f"coco:{scenes}", model="unet", task="segmentation", epochs=1, out=str(tmp_path / "seg"),
                       progress=False, overrides={"train.batch_size": 8, "model.kwargs.widths": [8, 16],
                                                  "log.report": False, "train.min_epoch_steps": 0})
    m = ServedModel(seg.path).load()
    img = next((scenes / "images").glob("*.png")) if (scenes / "images").is_dir() else next(scenes.rglob("*.png"))
    big = io.BytesIO()
    Image.open(img).resize((48, 40)).save(big, format="PNG")
    r = m.infer([m.prepare(big.getvalue(), "scene.png")])[0]
    mask = Image.open(io.BytesIO(base64.b64decode(r["mask"].split(",", 1)[1])))
    assert mask.size == (48, 40)  # in the upload's own pixels
    assert sum(r["pixels"].values()) == pytest.approx(1.0, abs=1e-4) and "(background)" not in r["legend"]
    with pytest.raises(VisrecError, match="segmentation runs explain with no attribution method"):
        m.explain([m.prepare(big.getvalue(), "scene.png")])
    from typer.testing import CliRunner

    from visrec.cli import app

    (tmp_path / "scene.png").write_bytes(big.getvalue())
    r = CliRunner().invoke(app, ["predict", str(seg.path), str(tmp_path / "scene.png"), str(tmp_path / "gone.png"),
                                 "--draw", str(tmp_path / "drawn"), "--resize", "--convert"])
    assert r.exit_code == 1 and "of the pixels" in r.stdout and "does not exist" in r.output
    assert Image.open(tmp_path / "drawn" / "scene.png").size == (48, 40)


# ------------------------------------------------------------------------------------------------ the web page


def _chromium() -> str | None:
    from browser import find_chromium

    return find_chromium()


@pytest.mark.skipif(_chromium() is None, reason="needs a chromium binary (Debian: apt-get install chromium)")
def test_the_page_predicts_dropped_images_in_headless_chromium(run, images, tmp_path, client):
    from browser import launch, watch_errors

    s = ServerProcess([str(run.path)], tmp_path / "server.log")
    outside: list[str] = []
    try:
        with launch() as browser:
            page = browser.new_page()
            errors = watch_errors(page)
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(s.url)
                       else (outside.append(route.request.url), route.abort()))
            page.goto(s.url + "/")
            page.wait_for_selector("#card dl")
            assert run.name in page.inner_text("#card")
            page.set_input_files("#files", [str(images[0]), str(images[1])])
            page.wait_for_selector(".result[data-state=done] >> nth=1")  # the page's CSP forbids eval: selectors only
            cards = page.query_selector_all(".result")
            shown = {c.query_selector(".name").inner_text(): c.query_selector(".top li .cls").inner_text()
                     for c in cards}
            for p in images[:2]:
                api = client.post("/v1/predict", content=png_bytes(p)).json()["results"][0]["top"][0]["class"]
                assert shown[p.name] == api
            button = cards[0].query_selector("button.cam")
            assert button.is_visible() and button.get_attribute("aria-pressed") == "false"
            button.focus()
            page.keyboard.press("Enter")  # keyboard, not the mouse
            page.wait_for_selector(".result button.cam[aria-pressed=true]")
            overlay = cards[0].query_selector("img.overlay")
            assert overlay.is_visible() and overlay.get_attribute("src").startswith("data:image/png;base64,")
            assert overlay.evaluate("(img) => img.naturalWidth") == 16
            page.keyboard.press("Enter")
            page.wait_for_selector(".result button.cam[aria-pressed=true]", state="detached")
            assert not overlay.is_visible()
            assert errors == [] and outside == []
    finally:
        s.stop()


def test_in_flight_gauge_only_counts_predictions(client):
    text = client.get("/metrics").text
    assert "visrec_in_flight 0.0" in text  # /metrics itself is not a prediction
