"""The course's captioning experiments on the generated scenes (2-core CPU), with time per epoch:

1. gradient flow back through time, vanilla RNN against LSTM, for sequence lengths up to 30: the norm of the
   last step's gradient with respect to the first input (vanishing), with the recurrent weights at their default
   scale and scaled up (exploding), and the parameter gradient norm before and after clipping at 5;
2. no attention (lstm) against soft attention (lstm_attention), same recipe and epochs;
3. greedy against beam search (3 and 5) on the attention model;
4. LSTM decoders against the transformer decoder.

    python bench/captioning.py [--epochs 6] [--out bench/captioning.json]   # writes captioning_gradients.png
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import visrec
from baseline import machine
from visrec.plotting import pyplot, save_figure

LENGTHS = (2, 5, 10, 15, 20, 25, 30)


def gradient_flow(kind: str, scale: float, clip: float = 5.0, hidden: int = 64, seed: int = 0) -> dict:
    """For each length T: |d(loss at step T)/d(input at step 1)|, and the parameter gradient norm before and after
    clipping, on random inputs (mean of 8 sequences)."""
    out = {"input_grad": [], "param_grad": [], "param_grad_clipped": []}
    for t in LENGTHS:
        torch.manual_seed(seed)
        net = (torch.nn.RNN if kind == "rnn" else torch.nn.LSTM)(32, hidden, batch_first=True)
        with torch.no_grad():
            net.weight_hh_l0.mul_(scale)
        x = torch.randn(8, t, 32, requires_grad=True)
        y, _ = net(x)
        loss = (y[:, -1] * torch.randn(8, hidden)).sum()
        loss.backward()
        out["input_grad"].append(float(x.grad[:, 0].norm(dim=1).mean()))
        total = float(torch.nn.utils.clip_grad_norm_(net.parameters(), clip))
        out["param_grad"].append(total)
        out["param_grad_clipped"].append(float(torch.sqrt(sum((p.grad ** 2).sum() for p in net.parameters()))))
    return out


def train(tmp: Path, model: str, epochs: int) -> dict:
    t0 = time.perf_counter()
    run = visrec.train("scenes", task="captioning", model=model, epochs=epochs, out=str(tmp / model),
                       progress=False, overrides={"log.report": False})
    from visrec.fit import evaluate_run

    ev = evaluate_run(run.path)
    s = run.summary
    return {"model": model, "path": str(run.path), "train_seconds": s["train_seconds"],
            "seconds_per_epoch": s["train_seconds"] / epochs, "wall_seconds": time.perf_counter() - t0,
            **{k: v for k, v in ev.metrics.items() if k != "n"}}


def beams(run_path: str, widths=(1, 3, 5), n: int = 500) -> list[dict]:
    from visrec.data.text import normalize_caption
    from visrec.runs import Run
    from visrec.tasks import task_of_run
    from visrec.tasks.captioning import corpus_bleu, scene_scores

    run = Run(run_path)
    task, ds = task_of_run(run)
    lm = run.load_model()
    test = ds.test
    refs = [[normalize_caption(c) for c in caps] for caps in test.targets["captions"][:n]]
    rows = []
    for k in widths:
        t0 = time.perf_counter()
        hyps, _ = task.captions(lm.model, test.images[:n], lm.normalizer, beam=k)
        secs = time.perf_counter() - t0
        rows.append({"beam": k, "seconds": secs, "images": n, **corpus_bleu(hyps, refs),
                     **(scene_scores(hyps, refs) or {})})
    return rows


def plot(flows: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, f in flows.items():
        axes[0].plot(LENGTHS, f["input_grad"], marker="o", label=name)
        axes[1].plot(LENGTHS, f["param_grad"], marker="o", label=f"{name}, raw")
        axes[1].plot(LENGTHS, f["param_grad_clipped"], ls="--", label=f"{name}, clipped at 5")
    axes[0].set(yscale="log", xlabel="sequence length T", ylabel="|dL_T / dx_1|",
                title="gradient reaching the first step")
    axes[1].set(yscale="log", xlabel="sequence length T", ylabel="parameter gradient norm",
                title="clipping bounds the update, not the flow")
    for ax in axes:
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    flows = {"rnn": gradient_flow("rnn", 1.0), "rnn, W_hh x3": gradient_flow("rnn", 3.0),
             "lstm": gradient_flow("lstm", 1.0), "lstm, W_hh x3": gradient_flow("lstm", 3.0)}
    plot(flows, args.out.with_name("captioning_gradients.png"))
    print("1. gradient reaching the first step from the last, |dL_T/dx_1|, T = " + ", ".join(map(str, LENGTHS)))
    for name, f in flows.items():
        print(f"   {name:14s} " + "  ".join(f"{v:9.2e}" for v in f["input_grad"]))
    print("   parameter gradient norm at T = 30, raw -> clipped at 5: " + "; ".join(
        f"{name} {f['param_grad'][-1]:.3g} -> {f['param_grad_clipped'][-1]:.3g}" for name, f in flows.items()))
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        runs = {m: train(tmp, m, args.epochs) for m in ("lstm", "lstm_attention", "transformer")}
        beam_rows = beams(runs["lstm_attention"]["path"])
    print(f"2 and 4. {args.epochs} epochs on 10,000 scenes (64 px, 1-4 Fashion-MNIST objects), test split (2,000):")
    keys = ("bleu1", "bleu4", "cider", "obj_precision", "obj_recall", "relation_acc", "size_acc")
    print(f"   {'decoder':15s} {'s/epoch':>8s} " + " ".join(f"{k:>12s}" for k in keys))
    for m, r in runs.items():
        print(f"   {m:15s} {r['seconds_per_epoch']:8.1f} " + " ".join(f"{r.get(k, float('nan')):12.4f}" for k in keys))
    print("3. greedy against beam search (lstm_attention, the first 500 test scenes):")
    for r in beam_rows:
        print(f"   beam {r['beam']}: BLEU-4 {r['bleu4']:.4f}, object recall {r.get('obj_recall', float('nan')):.4f}, "
              f"relations {r.get('relation_acc', float('nan')):.4f}, {r['seconds']:.1f} s "
              f"({1e3 * r['seconds'] / r['images']:.1f} ms/image)")
    for r in runs.values():
        r.pop("path")
    args.out.write_text(json.dumps({"machine": machine(), "gradient_flow": flows, "runs": runs,
                                    "beams": beam_rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
