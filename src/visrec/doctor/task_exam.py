"""The playbook's checks that carry over to tasks other than classification, run through the task seam (the task's
own targets, forward pass, loss and evaluation), so they work for localization, segmentation, detection and
instance segmentation alike:

- `data`: the task accepts the data (boxes, masks, one object per image, ...), the inputs are normalized;
- `recurrent-gradients` (captioning with a recurrent decoder): gradient-norm spikes (exploding; the clipping
  value to use) and how much of the last word's gradient reaches the first word (vanishing through time);
- `initial-loss`: finite, and near chance where the task knows chance (segmentation: ln(classes + 1);
  captioning: the words per caption, <END> included, times ln(vocabulary));
- `overfit`: a few training images, regularization off, until the task's own metric on those same images is near
  its best (mAP, mIoU, localization accuracy near 1);
- `lr-range`: the range test on the task's loss, the configured rate judged against it.

Classification keeps its own, longer examination (`visrec.doctor.exam`).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from ..data import ImageSet
from ..device import seed_everything
from ..training.optim import build_optimizer
from ..training.setup import build_model
from ..training.task import EvalSettings, Task
from .findings import Finding
from .lr_finder import default_range, lr_range_test

OVERFIT_TARGET = 0.8  # the task's primary metric on the memorized images that counts as "overfit"
OVERFIT_LOSS_SHARE = 0.5  # for a metric to lower: the training loss on those images must fall below this share


class _TaskForward(nn.Module):
    """A model and its task as one module whose input is (images, targets): the LR range test drives it."""

    def __init__(self, model: nn.Module, task: Task):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, xy: tuple[torch.Tensor, Any]) -> Any:
        return self.task.forward(self.model, *xy)


def _subset(data: ImageSet, idx: torch.Tensor) -> ImageSet:
    t = data.targets
    targets = None if t is None else {k: (v[idx] if isinstance(v, torch.Tensor) else [v[i] for i in idx.tolist()])
                                      for k, v in t.items()}
    return ImageSet(data.images[idx], data.labels[idx], data.classes, targets=targets)


def _move(t: Any, device: torch.device) -> Any:
    if isinstance(t, dict):
        return {k: _move(v, device) for k, v in t.items()}
    return t.to(device) if isinstance(t, torch.Tensor) else t


class TaskExam:
    """The checks above, on an `Exam` (config, data, options, findings) and the run's task."""

    def __init__(self, ex, task: Task):
        self.ex, self.task = ex, task
        task.check(ex.ds)  # a task that cannot learn from the data says why, with the fix, before anything runs
        self.outputs = task.num_outputs(ex.ds)
        ex.cfg.model.kwargs = {**task.model_kwargs(ex.ds, ex.cfg.model.name), **ex.cfg.model.kwargs}

    def new_model(self, seed: int | None = None) -> nn.Module:
        ex = self.ex
        seed_everything(ex.opts.seed if seed is None else seed)
        m, _, _ = build_model(ex.cfg, ex.ds, ex.normalizer, self.outputs, seed=seed, load_weights_from_config=False)
        self.task.check_model(m, ex.ds)
        return m.to(ex.device)

    def batch(self, n: int, seed: int) -> tuple[torch.Tensor, Any, ImageSet]:
        train = self.ex.ds.train
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
        part = _subset(train, idx)
        x = self.ex.normalizer(part.images.to(self.ex.device))
        return x, _move(self.task.targets(part), self.ex.device), part

    # ---------------------------------------------------------------- checks

    def check_data(self) -> None:
        ex = self.ex
        x, _, _ = self.batch(min(256, len(ex.ds.train)), 1)
        mean, std = float(x.mean()), float(x.std())
        ev = {"mean": round(mean, 3), "std": round(std, 3), "task": self.task.name}
        if self.task.raw_pixels:  # the model scales raw pixels itself (generate, style)
            ex.add("data", Finding("input-not-normalized", "ok", f"the {self.task.name} task accepts the data; its "
                                   "models take raw pixels (0..255) and scale them themselves", ev))
        elif abs(mean) > 3 or std > 10 or std < 0.05:
            ex.add("data", Finding("input-not-normalized", "warn", f"inputs reach the model with mean {mean:.3g} and "
                                   f"std {std:.3g}", ev, "use --set data.normalize=channel"))
        else:
            ex.add("data", Finding("input-not-normalized", "ok", f"the {self.task.name} task accepts the data; inputs "
                                   f"are normalized (mean {mean:.2f}, std {std:.2f})", ev))

    def check_initial_loss(self) -> None:
        ex = self.ex
        model = self.new_model()
        model.train()
        x, y, _ = self.batch(min(16, len(ex.ds.train)), 2)
        with torch.no_grad():
            loss = float(self.task.loss(self.task.forward(model, x, y), y))
        chance = self.chance_loss(y)
        ev = {"observed": round(loss, 4), "expected": None if chance is None else round(chance, 4)}
        ex.results["initial_loss"] = loss
        if not math.isfinite(loss):
            ex.add("initial-loss", Finding("non-finite-loss", "error", f"the {self.task.name} loss of a fresh model "
                                           f"is {loss} before any step", ev,
                                           "check the targets (boxes with area, masks of the image's size) and "
                                           "normalize the input"))
            ex.abort = True
            return
        if chance is not None and not 0.5 < loss / chance < 2:
            ex.add("initial-loss", Finding("initial-loss-off", "warn", f"the initial loss is {loss:.4g}, but a "
                                           f"network that knows nothing should score about {chance:.3f}", ev,
                                           "scale the last layer's initialization down"))
            return
        near = f", near chance ({chance:.3f})" if chance is not None else ""
        ex.add("initial-loss", Finding("initial-loss-off", "ok", f"the initial loss {loss:.3f} is finite{near}", ev))

    def chance_loss(self, targets: Any = None) -> float | None:
        return self.task.chance_loss(self.outputs, targets)  # the task's own (captioning: words x ln(vocabulary))

    def check_overfit(self) -> None:
        ex, task, o = self.ex, self.task, self.ex.opts
        n = min(8, len(ex.ds.train))
        steps = max(10, o.overfit_steps // 2)
        x, y, part = self.batch(n, 5)
        model = self.new_model()
        cfg_opt = copy.deepcopy(ex.cfg.optim)
        cfg_opt.weight_decay = 0.0
        opt = build_optimizer(model, cfg_opt)
        model.train()
        first = last = math.nan
        for i in range(steps):
            loss = task.loss(task.forward(model, x, y), y)
            if i == 0:
                first = float(loss.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if ex.cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), ex.cfg.optim.grad_clip)
            opt.step()
            last = float(loss.detach())
            if not math.isfinite(last):
                break
        r = task.evaluate(model, part, ex.normalizer, split="train", settings=EvalSettings(batch_size=64))
        metric = task.overfit_metric or task.primary
        value = r.metrics.get(metric, math.nan)
        ev = {"examples": n, "steps": steps, "first_loss": round(first, 4), "last_loss": round(last, 4),
              metric: round(value, 4) if math.isfinite(value) else None, "lr": cfg_opt.lr}
        if task.maximize:
            ok = math.isfinite(value) and value >= OVERFIT_TARGET
        else:  # a metric to lower (bits/dim, a perceptual loss) has no absolute target: the loss must fall
            ok = math.isfinite(last) and last <= OVERFIT_LOSS_SHARE * first
        ex.results["overfit"] = {"success": bool(ok), **ev}
        if ok:
            ex.add("overfit", Finding("cannot-overfit", "ok", f"the model memorizes {n} training images: "
                                      f"{metric} {value:.3f} on them after {steps} steps (loss {first:.3g} -> "
                                      f"{last:.3g})", ev))
            return
        ex.add("overfit", Finding(
            "cannot-overfit", "warn",
            f"after {steps} steps on {n} training images the model reaches only {metric} "
            f"{value:.3f} on those same images (loss {first:.3g} -> {last:.3g}); a working setup memorizes them",
            ev, "check the learning rate (the range test below), the targets, and that the model's head fits the "
                "task; then train longer on the few images"))

    def check_lr_range(self) -> None:
        ex, task, c = self.ex, self.task, self.ex.cfg.optim
        model = self.new_model()
        wrapped = _TaskForward(model, task)
        opt = build_optimizer(model, c)
        bs = min(ex.cfg.train.batch_size, 16, len(ex.ds.train))
        steps = max(20, ex.opts.lr_steps // 2)

        def batch(i: int):
            x, y, _ = self.batch(bs, 100 + i)
            return (x, y), y

        lo, hi = default_range(c.name, c.lr)
        res = lr_range_test(wrapped, opt, batch, task.loss, lr_min=lo, lr_max=hi, steps=steps)
        ex.results["lr_range"] = res
        from .plots import plot_lr_finder

        ex.plots.append(plot_lr_finder(res.lrs, res.smoothed, res.suggested, c.lr, ex.out / "plots" / "lr_finder.png"))
        ev = {"configured_lr": c.lr, **res.to_dict()}
        if not res.conclusive:
            ex.add("lr-range", Finding("lr-range-inconclusive", "info", f"the range test is inconclusive: the loss "
                                       f"fell only {res.drop:.0%} at any rate between {lo:.0e} and {hi:.0e}", ev))
        elif res.lr_diverged is not None and c.lr >= res.lr_diverged:
            ex.add("lr-range", Finding("lr-too-high", "warn", f"the learning rate {c.lr:g} is past the point where "
                                       f"the {task.name} loss blows up ({res.lr_diverged:.2g})", ev,
                                       f"lower it: --lr {res.suggested:.2g}"))
        elif c.lr < res.lr_at_min / 100:
            ex.add("lr-range", Finding("lr-too-low", "warn", f"the learning rate {c.lr:g} is "
                                       f"{res.lr_at_min / c.lr:.0f}x below the best range (lowest loss near "
                                       f"{res.lr_at_min:.2g})", ev, f"raise it: --lr {res.suggested:.2g}"))
        else:
            ex.add("lr-range", Finding("lr-too-high", "ok", f"the learning rate {c.lr:g} is inside the useful range "
                                       f"(the {task.name} loss falls fastest up to about {res.lr_at_min:.2g})", ev))


    def check_recurrent_gradients(self) -> None:
        """Recurrent decoders (captioning): 30 steps at the configured rate, watching the gradient norm before
        clipping (spikes: exploding) and how much of the last word's gradient reaches the first word's input
        (vanishing through time)."""
        ex, task = self.ex, self.task
        model = self.new_model()
        if not getattr(model, "captioner", False) or not hasattr(model, "embed") or hasattr(model, "decoder"):
            return  # not recurrent (the transformer attends to every word directly)
        cfg_opt = copy.deepcopy(ex.cfg.optim)
        opt = build_optimizer(model, cfg_opt)
        model.train()
        bs = min(ex.cfg.train.batch_size, 32, len(ex.ds.train))
        norms = []
        for i in range(30):
            x, y, _ = self.batch(bs, 200 + i)
            loss = task.loss(task.forward(model, x, y), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))))
            if ex.cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), ex.cfg.optim.grad_clip)
            opt.step()
        # how much of the last word's loss gradient reaches the first word's embedding, against its own
        x, y, _ = self.batch(bs, 300)
        kept: dict[str, torch.Tensor] = {}

        def keep(module, inputs, output) -> None:  # returns None: the output stays as it is
            output.retain_grad()
            kept["e"] = output

        hook = model.embed.register_forward_hook(keep)
        out = task.forward(model, x, y)
        hook.remove()
        target = out["target"]
        last = (target != 0).sum(1) - 1  # each caption's last word (its <END>)
        rows = torch.arange(len(last), device=last.device)
        logp = out["logits"][rows, last].log_softmax(-1)
        (-logp[rows, target[rows, last]].sum()).backward()
        g = kept["e"].grad.norm(dim=-1)  # (B, T)
        reach = float(g[:, 0].mean() / g[rows, last].mean().clamp_min(1e-30))
        med = sorted(norms)[len(norms) // 2]
        ev = {"grad_norm_median": round(med, 4), "grad_norm_max": round(max(norms), 4),
              "first_word_share": float(f"{reach:.3g}"), "grad_clip": ex.cfg.optim.grad_clip}
        ex.results["recurrent_gradients"] = ev
        clip = f"{2 * med:.2g}"
        if max(norms) > 10 * med:
            ex.add("recurrent-gradients", Finding(
                "exploding-gradients", "warn", f"the gradient norm spikes to {max(norms):.3g}, {max(norms) / med:.0f}x "
                f"its median {med:.3g}, within 30 steps: the recurrence amplifies some updates", ev,
                f"clip the gradient norm near twice the median: --set optim.grad_clip={clip}"))
        elif reach < 1e-3:
            ex.add("recurrent-gradients", Finding(
                "vanishing-gradients", "warn", f"the first word's input receives {reach:.2g} of the gradient the "
                "last word's loss gives its own input: long captions are learned from their ends only", ev,
                "use an LSTM or GRU (not the vanilla RNN), or attention (lstm_attention, transformer)"))
        else:
            ex.add("recurrent-gradients", Finding(
                "exploding-gradients", "ok", f"gradients through time are steady (norm median {med:.3g}, max "
                f"{max(norms):.3g}); the first word gets {reach:.2g} of the last word's gradient", ev))


TASK_CHECKS = ("data", "initial-loss", "overfit", "lr-range", "recurrent-gradients")


def run_task_checks(ex, task: Task, console=None) -> dict[str, dict[str, Any]]:
    """Run TASK_CHECKS (or the subset in ex.opts.checks); returns each check's status and seconds."""
    import time

    from .findings import SEVERITIES

    te = TaskExam(ex, task)
    fns = {"data": te.check_data, "initial-loss": te.check_initial_loss, "overfit": te.check_overfit,
           "lr-range": te.check_lr_range, "recurrent-gradients": te.check_recurrent_gradients}
    timings: dict[str, dict[str, Any]] = {}
    for name in TASK_CHECKS:
        if name == "recurrent-gradients" and not task.sequence_model:
            continue
        if ex.opts.checks is not None and name not in ex.opts.checks:
            continue
        if ex.abort:
            timings[name] = {"status": "skipped (an earlier check found a blocking problem)", "seconds": 0.0}
            continue
        if console is not None:
            console.print(f"[dim]doctor: {name}...[/dim]")
        t0 = time.perf_counter()
        n_before = len(ex.findings)
        fns[name]()
        worst = max((f.rank for f in ex.findings[n_before:]), default=0)
        timings[name] = {"status": SEVERITIES[worst], "seconds": time.perf_counter() - t0}
    return timings
