"""Time to accuracy: visrec's presets against the plain PyTorch loop, on the same machine in the same run.

1. The baseline, bench/baseline.py's hand-written loop, with test accuracy every quarter epoch (outside the timed
   region): its time to 91% is the first quarter-epoch point at or above 91%, and the crossing interpolated
   between the points around it; its epoch time is the mean over its epochs.
2. Each preset and seed as configured, with test accuracy at each epoch end (the run's own test-time evaluation,
   outside the timed region).
3. Below epoch granularity for visrec: the preset under time budgets (`train.time_budget`, which plans the whole
   schedule to end on time), 3 seeds each; visrec's time to 91% is the smallest budget whose mean reaches it.
   The budgets are set from the loop's time to 91% in this run (`--speedups 8,10,12`: a tenth of it, and so on),
   so a slow or fast moment of the machine moves both sides alike.
4. The preset with a budget of exactly one baseline epoch (measured above, in this run), 3 seeds: does it reach
   93% in the time the loop spends on one epoch?
5. The whole `visrec train fashion-mnist --preset P` command, timed once as a user runs it.

    python bench/time_to_accuracy.py [--presets fmnist-fast] [--seeds 0,1,2] [--speedups 8,10,12] [--budgets 5,6]
                                     [--baseline-epochs 4]
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
from baseline import first_reaching, interpolated_crossing, machine, plain_loop
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


def visrec_preset(preset: str, seed: int, budget: float | None = None, quiet: bool = False) -> dict:
    from visrec.config import resolve_config

    extra = [f"train.time_budget={budget:.2f}s"] if budget else []
    cfg = resolve_config(preset, [f"train.seed={seed}", "log.report=false", *extra])
    curve = TestCurve()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = visrec.Trainer(cfg, out=Path(tmp) / "run", callbacks=[] if budget else [curve], progress=False,
                                 quiet=quiet)
        curve.trainer = trainer
        s = trainer.fit().summary
    if budget:
        print(f"  {preset} budget {budget:5.1f} s seed {seed}: {s['train_seconds']:6.1f} s  test {s['test_acc']:.2%}",
              flush=True)
        return {"preset": preset, "seed": seed, "budget": budget, "train_seconds": s["train_seconds"],
                "test_acc": s["test_acc"], "steps": s["steps"]}
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
    ap.add_argument("--budgets", default="", help="seconds: time budgets for the time to 91%%")
    ap.add_argument("--speedups", default="8,10,12",
                    help="more budgets, as the loop's time to 91%% (quarter-epoch points, this run) divided by each "
                         "of these: this machine's speed drifts between runs, the ratio is what is compared")
    ap.add_argument("--baseline-epochs", type=int, default=4)
    ap.add_argument("--no-command", action="store_true", help="skip timing the CLI command")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    speedups = [float(r) for r in args.speedups.split(",") if r.strip()]
    print(f"machine: {machine()}", flush=True)
    print("baseline (plain PyTorch loop, test accuracy every quarter epoch):", flush=True)
    base = plain_loop(args.baseline_epochs, evals_per_epoch=4)
    for level in LEVELS:
        base[f"seconds_to_{round(level * 100)}"] = first_reaching(base["curve"], level)
        base[f"interpolated_to_{round(level * 100)}"] = interpolated_crossing(base["curve"], level)
    loop_epoch = base["epoch_seconds"]
    print(f"  plain loop: {loop_epoch:.1f} s per epoch; to 91% at quarter-epoch points: {_fmt(base['seconds_to_91'])}"
          f" (interpolated {_fmt(base['interpolated_to_91'])})", flush=True)
    if speedups and base["seconds_to_91"] is None:
        sys.exit(f"--speedups {args.speedups}: the loop did not reach 91% in {args.baseline_epochs} epochs; "
                 "give more --baseline-epochs or seconds in --budgets")
    budgets = sorted(set(budgets) | {round(base["seconds_to_91"] / r, 2) for r in speedups})
    result = {"machine": machine(), "baseline": base, "presets": {}}
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        print(f"visrec --preset {preset}:", flush=True)
        runs = [visrec_preset(preset, s) for s in seeds]
        accs = [r["test_acc"] for r in runs]
        secs = [r["train_seconds"] for r in runs]
        entry = {"runs": runs, "test_acc_mean": statistics.mean(accs),
                 "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                 "train_seconds_mean": statistics.mean(secs), "loop_epochs": statistics.mean(secs) / loop_epoch}
        for level in LEVELS:
            key = f"seconds_to_{round(level * 100)}"
            times = [r[key] for r in runs]
            entry[key] = statistics.mean(times) if all(t is not None for t in times) else None
        print(f"visrec --preset {preset} under time budgets (3 seeds each):", flush=True)
        ladder = []
        for b in budgets:
            rs = [visrec_preset(preset, s, budget=b, quiet=True) for s in seeds]
            ladder.append({"budget": b, "runs": rs, "test_acc_mean": statistics.mean(r["test_acc"] for r in rs),
                           "train_seconds_mean": statistics.mean(r["train_seconds"] for r in rs)})
        entry["budgets"] = ladder
        reach = next((row for row in ladder if row["test_acc_mean"] >= 0.91), None)
        entry["budget_to_91"] = reach["train_seconds_mean"] if reach else None
        b91 = base["seconds_to_91"]
        entry["speedup_to_91"] = b91 / entry["budget_to_91"] if b91 and entry["budget_to_91"] else None
        entry["speedup_to_91_interpolated"] = (base["interpolated_to_91"] / entry["budget_to_91"]
                                               if base["interpolated_to_91"] and entry["budget_to_91"] else None)
        print(f"visrec --preset {preset} with a budget of one loop epoch ({loop_epoch:.1f} s, 3 seeds):", flush=True)
        one = [visrec_preset(preset, s, budget=loop_epoch, quiet=True) for s in seeds]
        entry["one_loop_epoch"] = {"budget": loop_epoch, "runs": one,
                                   "test_acc_mean": statistics.mean(r["test_acc"] for r in one)}
        if not args.no_command:
            entry["command"] = command_wall(preset)
        result["presets"][preset] = entry
    print(f"\nplain loop: final {base['test_acc']:.2%} after {args.baseline_epochs} epochs "
          f"({base['train_seconds']:.1f} s, {loop_epoch:.1f} s per epoch); to 91%: {_fmt(base['seconds_to_91'])} "
          f"(quarter-epoch points; interpolated {_fmt(base['interpolated_to_91'])}); to 93%: "
          f"{_fmt(base['seconds_to_93'])}")
    for preset, e in result["presets"].items():
        print(f"{preset}: {e['test_acc_mean']:.2%} +- {e['test_acc_std']:.2%} in {e['train_seconds_mean']:.1f} s "
              f"({len(seeds)} seeds) = {e['loop_epochs']:.2f} loop epochs; to 93% at epoch ends: "
              f"{_fmt(e['seconds_to_93'])}")
        for row in e["budgets"]:
            print(f"  budget {row['budget']:.1f} s (loop's time to 91% / {base['seconds_to_91'] / row['budget']:.1f}): "
                  f"test {row['test_acc_mean']:.2%} (mean of {len(row['runs'])} seeds, "
                  f"{row['train_seconds_mean']:.1f} s)")
        if e["speedup_to_91"]:
            print(f"  time to 91%: {e['budget_to_91']:.1f} s (smallest budget whose mean reaches it) against the "
                  f"loop's {base['seconds_to_91']:.1f} s: {e['speedup_to_91']:.1f}x faster "
                  f"({e['speedup_to_91_interpolated']:.1f}x against its interpolated crossing)")
        else:
            print("  time to 91%: no budget tried reached it")
        o = e["one_loop_epoch"]
        print(f"  with one loop epoch of training ({o['budget']:.1f} s): test {o['test_acc_mean']:.2%} (mean of "
              f"{len(o['runs'])} seeds; target 93.00%)")
        if "command" in e:
            print(f"  command: {e['command']['wall_seconds']:.0f} s wall clock")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
