"""Time to accuracy: visrec's presets against the plain PyTorch loop, on the same machine in the same run.

For each preset and seed, the Trainer runs in this process with an observer that measures test accuracy at each
epoch end (with the run's own test-time evaluation, outside the timed region): time to 91% and to 93% is the
training time at the first epoch end that reaches it. The whole `visrec train fashion-mnist --preset P` command is
also timed once as a user runs it (wall clock, start-up, data loading and evaluation included). The baseline is
bench/baseline.py's hand-written loop, timed the same way.

    python bench/time_to_accuracy.py [--presets fmnist-fast] [--seeds 0,1,2] [--baseline-epochs 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import visrec
from baseline import first_reaching, machine, plain_loop
from visrec.evaluate import evaluate

LEVELS = (0.91, 0.93)


class TestCurve(visrec.Callback):
    """Test accuracy at every epoch end, evaluated as the run's final evaluation is (its TTA), model mode kept."""

    def __init__(self):
        self.trainer = None
        self.curve: list[dict] = []

    def on_epoch_end(self, state, records):
        t = self.trainer
        r = evaluate(state.model, t.ds.test, t.normalizer, batch_size=t.cfg.eval.batch_size,
                     channels_last=t.channels_last, amp_dtype=t.runtime.amp_dtype, tta=t.task.tta,
                     crop_pad=t.task.crop_pad)
        self.curve.append({"epoch": state.epoch, "train_seconds": round(state.train_seconds, 2),
                           "test_acc": r.acc})


def visrec_preset(preset: str, seed: int) -> dict:
    from visrec.config import resolve_config

    cfg = resolve_config(preset, [f"train.seed={seed}", "log.report=false"])
    curve = TestCurve()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = visrec.Trainer(cfg, out=Path(tmp) / "run", callbacks=[curve], progress=False)
        curve.trainer = trainer
        s = trainer.fit().summary
    out = {"preset": preset, "seed": seed, "train_seconds": s["train_seconds"], "test_acc": s["test_acc"],
           "images_per_s": s["images_per_s"], "curve": curve.curve}
    for level in LEVELS:
        out[f"seconds_to_{round(level * 100)}"] = first_reaching(curve.curve, level)
    print(f"  {preset} seed {seed}: {s['train_seconds']:6.1f} s  test {s['test_acc']:.2%}  to 91%: "
          f"{_fmt(out['seconds_to_91'])}  to 93%: {_fmt(out['seconds_to_93'])}", flush=True)
    return out


def command_wall(preset: str) -> dict:
    """`visrec train fashion-mnist --preset P` as a user runs it, timed from outside."""
    exe = shutil.which("visrec") or str(Path(sys.executable).parent / "visrec")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([exe, "train", "fashion-mnist", "--preset", preset, "--out", f"{tmp}/run", "--no-progress"],
                       check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        s = json.loads(Path(f"{tmp}/run/summary.json").read_text())
    print(f"  `visrec train fashion-mnist --preset {preset}`: {wall:.1f} s wall clock, test {s['test_acc']:.2%}, "
          f"training {s['train_seconds']:.1f} s", flush=True)
    return {"wall_seconds": wall, "test_acc": s["test_acc"], "train_seconds": s["train_seconds"]}


def _fmt(seconds: float | None) -> str:
    return "not reached" if seconds is None else f"{seconds:.1f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="fmnist-fast")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--baseline-epochs", type=int, default=4)
    ap.add_argument("--no-command", action="store_true", help="skip timing the CLI command")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"machine: {machine()}", flush=True)
    print("baseline (plain PyTorch loop):", flush=True)
    base = plain_loop(args.baseline_epochs)
    for level in LEVELS:
        base[f"seconds_to_{round(level * 100)}"] = first_reaching(base["curve"], level)
    result = {"machine": machine(), "baseline": base, "presets": {}}
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        print(f"visrec --preset {preset}:", flush=True)
        runs = [visrec_preset(preset, s) for s in seeds]
        accs = [r["test_acc"] for r in runs]
        secs = [r["train_seconds"] for r in runs]
        entry = {"runs": runs, "test_acc_mean": statistics.mean(accs),
                 "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                 "train_seconds_mean": statistics.mean(secs)}
        for level in LEVELS:
            key = f"seconds_to_{round(level * 100)}"
            times = [r[key] for r in runs]
            entry[key] = statistics.mean(times) if all(t is not None for t in times) else None
            b = base[key] if base[key] is not None else None
            # the loop never reaching the level makes the ratio a lower bound (its whole training time)
            ref = b if b is not None else base["train_seconds"]
            entry[f"speedup_to_{round(level * 100)}"] = (ref / entry[key]) if entry[key] else None
            entry[f"speedup_to_{round(level * 100)}_is_lower_bound"] = b is None
        if not args.no_command:
            entry["command"] = command_wall(preset)
        result["presets"][preset] = entry
    print(f"\nplain loop: final {base['test_acc']:.2%} after {args.baseline_epochs} epochs "
          f"({base['train_seconds']:.1f} s); to 91%: {_fmt(base['seconds_to_91'])}; "
          f"to 93%: {_fmt(base['seconds_to_93'])}")
    for preset, e in result["presets"].items():
        line = (f"{preset}: {e['test_acc_mean']:.2%} +- {e['test_acc_std']:.2%} in {e['train_seconds_mean']:.1f} s "
                f"({len(seeds)} seeds); to 91%: {_fmt(e['seconds_to_91'])}; to 93%: {_fmt(e['seconds_to_93'])}")
        for level in (91, 93):
            if e[f"speedup_to_{level}"]:
                bound = ">= " if e[f"speedup_to_{level}_is_lower_bound"] else ""
                line += f"; time to {level}%: {bound}{e[f'speedup_to_{level}']:.2f}x faster than the loop"
        if "command" in e:
            line += f"; command {e['command']['wall_seconds']:.0f} s wall clock"
        print(line)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
