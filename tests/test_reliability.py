"""Nothing is lost: checkpoints survive SIGKILL at any moment, corrupt files fall back, resume is exact."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import visrec
from visrec import checkpoint as ck
from visrec.errors import VisrecError

SYN = "synthetic:classes=4,size=12,train=384,test=128"
LONGER = "synthetic:classes=4,size=12,train=1536,test=128"  # 192 steps: time to kill it mid-run
FAST = {"train.batch_size": 32, "train.min_epoch_steps": 0, "log.every": 4,
        "model.kwargs.widths": [8, 16, 16], "device.threads": 1}
SRC = Path(__file__).resolve().parents[1] / "src"


def _train_script(out: str, every: int) -> str:
    return (f"import visrec; visrec.train({LONGER!r}, epochs=4, out={out!r}, "
            f"overrides={{**{FAST!r}, 'train.checkpoint_every': {every}}}, progress=False)")


def _complete_files(folder: Path) -> None:
    """Every file under a final name is whole: each safetensors file parses, each JSON file parses."""
    for f in folder.iterdir():
        if f.name.startswith("."):
            continue  # temporary names
        if f.suffix == ".safetensors":
            load_file(str(f))
        elif f.suffix == ".json":
            json.loads(f.read_text())


def _step(path: Path) -> int:
    try:
        return json.loads(path.read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.parametrize("after_step", [10, 100])
def test_sigkill_at_any_moment_then_resume_is_bitwise_exact(tmp_path, after_step):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-c", _train_script("runs/killed", 2)], env=env, cwd=tmp_path)
    last = tmp_path / "runs/killed/checkpoints/last.json"
    t0 = time.time()
    while _step(last) < after_step and time.time() - t0 < 120 and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # wherever it is now: in a step, or in the middle of the next save
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    _complete_files(last.parent)
    killed_at = ck.load_checkpoint(last.parent, "last", with_state=True).meta["step"]
    resumed = visrec.resume(tmp_path / "runs/killed", progress=False)
    straight = visrec.train(LONGER, epochs=4, out=str(tmp_path / "runs/straight"),
                            overrides={**FAST, "train.checkpoint_every": 2}, progress=False)
    assert resumed.status == "completed" and 0 < killed_at < straight.summary["steps"]
    a = ck.load_checkpoint(straight.path / "checkpoints", "last", with_state=True)
    b = ck.load_checkpoint(resumed.path / "checkpoints", "last", with_state=True)
    assert a.meta["step"] == b.meta["step"] and a.meta.get("schedule") == b.meta.get("schedule")
    for k in a.weights:
        assert torch.equal(a.weights[k], b.weights[k]), k
    for pid, st in a.optimizer["state"].items():
        for k, v in st.items():
            w = b.optimizer["state"][pid][k]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w
    assert set(a.rng) == set(b.rng) and all(torch.equal(a.rng[k], b.rng[k]) for k in a.rng)
    assert resumed.summary["test_acc"] == straight.summary["test_acc"]


def test_killed_in_the_middle_of_saves_leaves_the_last_complete_checkpoint(tmp_path):
    # A writer that does nothing but save a large model: a kill almost always lands inside a save.
    script = (
        "import sys, torch\n"
        "from visrec.checkpoint import save_checkpoint\n"
        "m = torch.nn.Linear(2000, 2000)\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)\n"
        "m(torch.randn(4, 2000)).sum().backward(); opt.step()\n"
        "step = 0\n"
        "while True:\n"
        "    step += 1\n"
        "    with torch.no_grad(): m.weight.fill_(float(step))\n"
        "    save_checkpoint(__import__('pathlib').Path(sys.argv[1]), 'last', m, {'step': step}, optimizer=opt)\n"
    )
    folder = tmp_path / "ck"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    for delay in (0.4, 0.9, 1.3):
        proc = subprocess.Popen([sys.executable, "-c", script, str(folder)], env=env)
        while not (folder / "last.json").is_file():
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _complete_files(folder)
        got = ck.load_checkpoint(folder, "last", with_state=True)
        assert got.fallback is None  # the latest JSON always names complete files
        assert torch.all(got.weights["weight"] == float(got.meta["step"]))
        assert len(list(folder.glob("last-*.safetensors"))) <= 6  # two generations kept, the rest removed


def _model_and_two_saves(folder: Path):
    m = nn.Linear(3, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    ck.save_checkpoint(folder, "last", m, {"step": 1}, optimizer=opt)
    with torch.no_grad():
        m.weight.add_(1.0)
    ck.save_checkpoint(folder, "last", m, {"step": 2}, optimizer=opt)
    return m, opt


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "bad-json"])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    folder = tmp_path / "ck"
    _model_and_two_saves(folder)
    latest = json.loads((folder / "last.json").read_text())
    weights = folder / latest["files"]["weights"]["file"]
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:40])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "delete":
        weights.unlink()
    else:
        (folder / "last.json").write_text("{not json")
    with pytest.warns(UserWarning, match=r"using the previous checkpoint .*last\.prev\.json \(step 1\)"):
        got = ck.load_checkpoint(folder, "last", with_state=True)
    assert got.meta["step"] == 1 and got.fallback
    if damage != "bad-json":
        assert weights.name in got.fallback  # the report names the bad file


def test_both_generations_corrupt_is_an_error_that_names_them(tmp_path):
    folder = tmp_path / "ck"
    _model_and_two_saves(folder)
    for name in ("last.json", "last.prev.json"):
        entry = json.loads((folder / name).read_text())["files"]["weights"]["file"]
        (folder / entry).write_bytes(b"junk")
    with pytest.raises(VisrecError, match=r"(?s)corrupt.*previous checkpoint is unusable too.*corrupt"):
        ck.load_checkpoint(folder, "last")


def test_a_full_disk_is_reported_and_earlier_checkpoints_stay_loadable(tmp_path, monkeypatch):
    folder = tmp_path / "ck"
    m, opt = _model_and_two_saves(folder)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(VisrecError, match=r"(?s)no space left.*intact.*--resume"):
        ck.save_checkpoint(folder, "last", m, {"step": 3}, optimizer=opt)
    assert ck.load_checkpoint(folder, "last", with_state=True).meta["step"] == 2
    assert not list(folder.glob("last-000000003-*"))  # nothing of the failed save is left behind


def test_fixed_name_points_at_the_latest_weights(tmp_path):
    folder = tmp_path / "ck"
    m, _ = _model_and_two_saves(folder)
    assert torch.equal(load_file(str(folder / "last.safetensors"))["weight"], m.weight.detach())


def test_no_torch_load_without_weights_only():
    # Every call says weights_only; the one weights_only=False is load_weights' explicit trust branch.
    calls, unsafe = [], []
    for path in SRC.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"torch\.load\(", line):
                calls.append(f"{path.name}:{n}")
                if "weights_only=True" not in line:
                    unsafe.append((path.name, line.strip()))
    assert calls
    assert unsafe == [("io.py", 'obj = torch.load(path, map_location="cpu", weights_only=False)  # trusted by the '
                                "user's explicit choice")], unsafe


class _Payload:
    """A pickle that runs code when loaded: it would create a file named by its argument."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_weight_files_load_without_running_their_code(tmp_path):
    from visrec.io import load_weights

    m = nn.Linear(3, 2)
    torch.save(m.state_dict(), tmp_path / "plain.pt")
    torch.save({"state_dict": m.state_dict(), "epoch": 3}, tmp_path / "wrapped.pth")
    for name in ("plain.pt", "wrapped.pth"):
        assert torch.equal(load_weights(tmp_path / name)["weight"], m.weight.detach())
    marker = tmp_path / "pwned"
    torch.save({"weight": m.weight.detach(), "evil": _Payload(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(VisrecError, match=r"(?s)evil\.pt.*would run code.*--trust-checkpoint"):
        load_weights(tmp_path / "evil.pt")
    assert not marker.exists()  # refused before anything ran
    with pytest.raises(VisrecError, match="does not hold a state dict"):  # trusted: it loads (and runs) ...
        load_weights(tmp_path / "evil.pt", trust=True)
    assert marker.exists()  # ... which is exactly why trust must be explicit
    (tmp_path / "cut.pt").write_bytes((tmp_path / "plain.pt").read_bytes()[:30])
    with pytest.raises(VisrecError, match="cut.pt cannot be read"):
        load_weights(tmp_path / "cut.pt")


def test_train_starts_from_a_weight_file_and_reinitializes_a_different_head(tmp_path):
    from safetensors.torch import save_file

    from visrec import Trainer
    from visrec.models import create_model

    donor = create_model("convnet", in_chans=1, num_classes=7, image_size=12, widths=[8, 16, 16])
    save_file(donor.state_dict(), str(tmp_path / "donor.safetensors"))
    cfg = visrec.resolve_config(None, {**FAST, "data.name": SYN, "model.weights": str(tmp_path / "donor.safetensors")})
    trainer = Trainer(cfg, out=str(tmp_path / "runs/w"), progress=False)
    got, want = trainer.model.state_dict(), donor.state_dict()
    assert all(torch.equal(got[k].cpu(), want[k]) for k in want if not k.startswith("head."))
    assert got["head.weight"].shape == (4, 16) and "head.weight" in trainer.initial_weights_note
    assert trainer.fit().status == "completed"
    other = create_model("resnet20", in_chans=1, num_classes=4, image_size=12)
    save_file(other.state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(VisrecError, match=r"(?s)other\.safetensors does not fit.*missing.*unexpected"):
        visrec.train(SYN, epochs=1, out=str(tmp_path / "runs/x"),
                     overrides={**FAST, "model.weights": str(tmp_path / "other.safetensors")}, progress=False)


def _png(path: Path, size=(12, 12), mode="RGB", color=(200, 10, 10)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def test_validate_reports_one_of_each_problem_and_fails(tmp_path):
    from typer.testing import CliRunner

    from visrec.cli import app

    root = tmp_path / "data"
    for c in ("1", "2", "10"):
        for i in range(3):
            _png(root / "train" / c / f"{i}.png", color=(i * 40, 10 * int(c), 5))
    _png(root / "test" / "1" / "a.png", color=(0, 10, 5))  # the same bytes as train/1/0.png: a leak
    (root / "train" / "2" / "zero.png").write_bytes(b"")
    from PIL import Image

    noise = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
    noise.save(root / "train" / "2" / "cut.png")
    whole = (root / "train" / "2" / "cut.png").read_bytes()
    (root / "train" / "2" / "cut.png").write_bytes(whole[: len(whole) * 6 // 10])  # header intact, pixels cut
    (root / "train" / "10" / "junk.jpg").write_bytes(b"this is not a jpeg")
    _png(root / "train" / "10" / "big.png", size=(400, 300))  # a bomb under a 100,000-pixel limit
    (root / "train" / "empty").mkdir()
    (root / "train" / ".cache").mkdir()
    (root / "train" / "1" / "notes.txt").write_text("hi")
    _png(root / "train" / "1" / "wide.png", size=(20, 12))
    (root / "test" / "3").mkdir(parents=True)
    _png(root / "test" / "3" / "x.png")

    r = CliRunner().invoke(app, ["validate", str(root), "--max-pixels", "100000", "--json"])
    assert r.exit_code == 1, r.output
    rep = json.loads(r.output)
    kinds = {(p["severity"], p["kind"]) for p in rep["problems"]}
    assert {("error", "empty"), ("error", "truncated"), ("error", "unreadable"), ("error", "bomb"),
            ("error", "empty-class"), ("error", "unknown-class"), ("warning", "duplicate-across-splits"),
            ("warning", "class-order"), ("note", "hidden-folder"), ("note", "not-an-image"),
            ("note", "mixed-sizes")} <= kinds
    by_kind = {p["kind"]: p["path"] for p in rep["problems"]}
    assert by_kind["empty"].endswith("zero.png") and by_kind["truncated"].endswith("cut.png")
    assert by_kind["unreadable"].endswith("junk.jpg") and by_kind["bomb"].endswith("big.png")
    clean = tmp_path / "clean"
    for c in ("cat", "dog"):
        _png(clean / c / "a.png", color=(1, 2, 3) if c == "cat" else (3, 2, 1))
    r = CliRunner().invoke(app, ["validate", str(clean)])
    assert r.exit_code == 0 and "0 errors" in r.output


def test_validate_says_how_training_fits_images_of_many_sizes(tmp_path):
    from typer.testing import CliRunner

    from visrec.cli import app

    root = tmp_path / "myphotos"
    for c in ("a", "b"):
        for i in range(3):
            _png(root / c / f"{i}.png", size=(20 + 7 * i + (c == "b"), 10 + 3 * i), color=(i * 40, 3, 3))
    r = CliRunner().invoke(app, ["validate", str(root)])
    assert r.exit_code == 0, r.output  # training fits them to one size
    assert "6 image sizes (no two alike, from 20x10 to 35x16)" in r.output and "data.image_size=N" in r.output
    assert "cover 13x13" in r.output  # the median shorter side: 10, 13, 16 for each class
    ds = visrec.load_dataset(f"folder:{root}", val_fraction=0)
    assert ds.image_size == (13, 13) and "several sizes" in ds.notes[0]
    r = CliRunner().invoke(app, ["validate", str(root), "--image-size", "16", "--json"])
    assert r.exit_code == 0, r.output
    (note,) = [p for p in json.loads(r.output)["problems"] if p["kind"] == "mixed-sizes"]
    assert note["severity"] == "note" and "resizes them to 16x16" in note["detail"]
    _png(root / "a" / "3.png", size=(20, 10))
    r = CliRunner().invoke(app, ["validate", str(root)])
    assert "most often 20x10, 2 images" in r.output


def test_training_refuses_a_decompression_bomb_by_its_header(tmp_path):
    root = tmp_path / "d"
    for c in ("a", "b"):
        for i in range(2):
            _png(root / c / f"{i}.png", size=(300, 300), color=(i * 90, 3, 3))
    _png(root / "a" / "huge.png", size=(400, 300))
    with pytest.raises(VisrecError, match=r"(?s)huge\.png claims 400x300 = 120,000 pixels.*data\.max_pixels"):
        visrec.load_dataset(f"folder:{root}", max_pixels=100_000, image_size=16)
    assert len(visrec.load_dataset(f"folder:{root}", max_pixels=200_000, image_size=16).classes) == 2


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript", "onnx"])
def test_exports_predict_like_the_run_and_carry_classes_and_preprocessing(tmp_path, fmt):
    from typer.testing import CliRunner

    from visrec.cli import app
    from visrec.export import read_export_metadata
    from visrec.models import create_model
    from visrec.runs import Run

    run = visrec.train(SYN, epochs=1, out=str(tmp_path / "runs/e"), overrides=FAST, progress=False)
    r = CliRunner().invoke(app, ["export", str(run.path), "--format", fmt])
    assert r.exit_code == 0, r.output
    path = next((run.path / "export").iterdir())
    meta = read_export_metadata(path)
    assert meta["classes"] == [f"class{i}" for i in range(4)] and meta["input"] == [1, 12, 12]
    assert meta["preprocess"]["mode"] == "channel"
    ds = visrec.load_dataset(SYN)
    x = ds.test.images[:16]
    lm = Run(run.path).load_model()
    with torch.no_grad():
        want = lm.model(lm.normalizer(x))
    pixels = x.float()
    if fmt == "safetensors":
        spec = meta["model"]
        m = create_model(spec["name"], in_chans=spec["in_chans"], num_classes=spec["num_classes"],
                         image_size=tuple(spec["image_size"]), **spec["kwargs"]).eval()
        m.load_state_dict(load_file(str(path)))
        from visrec.data.preprocess import Normalizer

        with torch.no_grad():
            got = m(Normalizer.from_state(meta["preprocess"])(x))
    elif fmt == "torchscript":
        with torch.no_grad():
            got = torch.jit.load(str(path))(pixels)
    else:
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(["logits"], {"pixels": pixels.numpy()})[0])
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_skip_bad_images_trains_without_them_and_lists_them_in_the_run(tmp_path):
    root = tmp_path / "d"
    for c in ("a", "b"):
        for i in range(12):
            _png(root / c / f"{i}.png", color=(i * 20, 3, 3) if c == "a" else (3, 3, i * 20))
    (root / "a" / "zero.png").write_bytes(b"")
    (root / "b" / "junk.png").write_bytes(b"not a png at all")
    with pytest.raises(VisrecError, match=r"zero\.png|junk\.png"):
        visrec.load_dataset(f"folder:{root}")
    run = visrec.train(f"folder:{root}", epochs=1, out=str(tmp_path / "runs/s"),
                       overrides={**FAST, "data.skip_bad_images": True, "data.augment": []}, progress=False)
    assert run.status == "completed"
    listed = (run.path / "skipped_images.txt").read_text().splitlines()
    assert len(listed) == 2 and any("zero.png\tempty" in line for line in listed)
    assert any("junk.png\tunreadable" in line for line in listed)
    splits = json.loads((run.path / "splits.json").read_text())
    assert splits["skipped_images"]["count"] == 2
    assert run.summary["n_train"] + splits["test"]["n"] + splits["val"]["n"] == 24


def test_a_poisoned_model_never_replaces_the_last_good_checkpoint(tmp_path):
    from visrec.training import NonFiniteLoss

    # Windows of 50 steps are where losses are checked; checkpoints every 2 steps fall in between.
    with pytest.raises(NonFiniteLoss):
        visrec.train(SYN, epochs=2, out=str(tmp_path / "runs/p"), progress=False,
                     overrides={**FAST, "log.every": 50, "train.checkpoint_every": 2, "optim.lr": 1e12,
                                "schedule.name": "constant", "data.normalize": "none"})
    folder = tmp_path / "runs/p/checkpoints"
    if (folder / "last.json").is_file():  # whatever was saved is finite
        for name in ("last.json", "last.prev.json"):
            if (folder / name).is_file():
                ckpt = ck._load_one(folder / name, with_state=False)
                assert all(torch.isfinite(v).all() for v in ckpt.weights.values()), name


def test_documented_image_conversions_on_generated_files(tmp_path):
    import numpy as np
    from PIL import Image

    from visrec.data.images import decode

    # EXIF orientation 6 (rotate 90 clockwise to display): a 4-wide, 2-tall file shows as 2 wide, 4 tall.
    a = np.zeros((2, 4, 3), np.uint8)
    a[:, :2] = (255, 0, 0)  # left half red, right half black in the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "rot.png", exif=exif)
    got = decode(tmp_path / "rot.png", 3)
    assert got.shape == (4, 2, 3)
    assert got[0, :, 0].tolist() == [255, 255] and got[3, :, 0].tolist() == [0, 0]  # red on top after rotation
    # CMYK -> RGB
    Image.new("CMYK", (3, 3), (0, 255, 255, 0)).save(tmp_path / "cmyk.tif")
    assert decode(tmp_path / "cmyk.tif", 3)[0, 0].tolist() == [255, 0, 0]
    # palette with a transparent index -> composited on white
    p = Image.new("P", (3, 3), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.save(tmp_path / "pal.png", transparency=1)
    assert decode(tmp_path / "pal.png", 3).min() == 255
    p.save(tmp_path / "pal_opaque.png")
    assert decode(tmp_path / "pal_opaque.png", 3)[0, 0].tolist() == [10, 200, 30]
    # LA (gray with alpha) on white, and color to gray only when one channel is asked for (ITU-R 601 luma)
    Image.new("LA", (2, 2), (0, 0)).save(tmp_path / "la.png")
    assert decode(tmp_path / "la.png", 1).min() == 255
    Image.new("RGB", (2, 2), (255, 0, 0)).save(tmp_path / "red.png")
    assert decode(tmp_path / "red.png", 1)[0, 0, 0] == 76
    assert decode(tmp_path / "red.png", 3)[0, 0].tolist() == [255, 0, 0]


def test_evaluation_maps_classes_by_name_never_by_position(tmp_path):
    import shutil

    from conftest import make_image_folder
    from visrec.runs import Run

    root = tmp_path / "pets"
    make_image_folder(root, per_class=16, splits=("train", "test"))
    run = visrec.train(f"folder:{root}", epochs=20, out=str(tmp_path / "runs/pets"),
                       overrides={**FAST, "data.augment": []}, progress=False)
    before = Run(run.path).evaluate("test")
    assert before.acc > 0.9  # classes differ in brightness: easy
    for split in ("train", "test"):  # the first class disappears: every other label shifts by one position
        shutil.rmtree(root / split / "cat")
    after = Run(run.path).evaluate("test")
    assert after.classes == ["cat", "dog", "emu"] and after.acc > 0.9  # by position it would be about 0%
    for split in ("train", "test"):
        shutil.copytree(root / split / "dog", root / split / "yak")
    with pytest.raises(VisrecError, match="never trained on: yak"):
        Run(run.path).evaluate("test")


def test_sigterm_saves_says_how_to_resume_and_exits_nonzero(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-c", "from visrec.cli import main; main()", "train", LONGER, "--epochs", "4",
           "--out", "runs/term", "--checkpoint-every", "5", "--no-progress", "--set", "model.kwargs.widths=[8,16,16]",
           "--set", "device.threads=1"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "runs/term/checkpoints/last.json"
    t0 = time.time()
    while _step(last) < 5 and time.time() - t0 < 120 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "runs/term" in err
    summary = json.loads((tmp_path / "runs/term/summary.json").read_text())
    assert summary["status"] == "interrupted" and _step(last) == summary["steps"]
