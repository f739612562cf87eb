"""The `visrec` command line: each command parses its options and calls the library."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import VisrecError

app = typer.Typer(
    name="visrec",
    help="Train, diagnose and inspect visual-recognition models (the CS231n curriculum, on PyTorch).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help that wraps long names (paths, run folders) instead of cutting them
)
data_app = typer.Typer(help="Get datasets; pack image folders into shards; see and clear the decoded cache.",
                       no_args_is_help=True, rich_markup_mode=None)
app.add_typer(data_app, name="data")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_USAGE, EXIT_NONFINITE, EXIT_INTERRUPTED = 2, 3, 130



def _dataset_source(ctx: typer.Context, value: str | None) -> str | None:
    """A dataset argument that is a path to a folder reads as folder:PATH (coco:PATH, yolo:PATH by its layout)."""
    if value is None or ctx.resilient_parsing:  # shell completion: nothing to resolve
        return value
    from .data.catalog import source_name

    return source_name(value)


# Options shared by several commands, defined once.
DatasetArg = Annotated[str | None, typer.Argument(
    help="data.name: a catalog name (see `visrec datasets`), folder:PATH, coco:PATH, yolo:PATH, wds:PATH (shards "
         "from visrec data pack), synthetic[:k=v,...], or a folder's path (read as folder:PATH, or coco:/yolo: by "
         "its layout).",
    callback=_dataset_source)]
ModelOpt = Annotated[str | None, typer.Option(
    help="model.name: a registered model (see `visrec models`), timm:NAME or path/to/file.py:function.")]
PresetOpt = Annotated[str | None, typer.Option(help="Shipped preset name or YAML file (see `visrec presets`).")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Override: section.key=value, repeatable (see `visrec config --keys`).")]
DataDirOpt = Annotated[Path | None, typer.Option(help="data.data_dir: folder searched first for dataset files.")]
DeviceOpt = Annotated[str | None, typer.Option(help="device.name: auto, cpu, cuda, cuda:N or mps.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
BackendOpt = Annotated[str, typer.Option(help=(
    "What runs the network: auto (onnxruntime on CPU when the network exports and agrees with torch, else torch), "
    "torch, channels_last, compile (torch.compile) or onnx. Detectors, captioning and style runs use torch."))]
ProgressOpt = Annotated[bool | None, typer.Option(
    "--progress/--no-progress", help="Live progress bar (default: on a terminal).")]


def out_option(what: str) -> typer.models.OptionInfo:
    """The `--out` option; `what` says what it names for this command."""
    return typer.Option("--out", help=what)


TaskOpt = Annotated[str | None, typer.Option(
    help="task.name: a registered task (`visrec tasks` lists them: classification, localization, keypoints, "
         "segmentation, detection, instance, captioning, style, generate), or file.py:ClassName.")]


def _config(preset: str | None, sets: list[str] | None, base=None, **options):
    """The config of a command, built in one place: defaults (or `base`), the preset, --set, then the command's
    dedicated options, given as dotted keys with `_` for the first `.` (`train_epochs=3`); None = not given."""
    from .config import resolve_config

    return resolve_config(preset, sets or [], base=base,
                          options={k.replace("_", ".", 1): v for k, v in options.items()})


def _version(value: bool) -> None:
    if value:
        from .version import __version__

        print(f"visrec {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print visrec's version and exit.")] = False,
) -> None:
    """Train, diagnose and inspect visual-recognition models (the CS231n curriculum, on PyTorch)."""


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@app.command()
def train(
    dataset: DatasetArg = None,
    model: ModelOpt = None,
    task: TaskOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    epochs: Annotated[int | None, typer.Option(help="train.epochs")] = None,
    batch_size: Annotated[int | None, typer.Option(help="train.batch_size")] = None,
    lr: Annotated[float | None, typer.Option(help="optim.lr")] = None,
    seed: Annotated[int | None, typer.Option(help="train.seed")] = None,
    out_dir: Annotated[Path | None, out_option("Run folder (default runs/<dataset>-<model>-<time>).")] = None,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = None,
    engine: Annotated[str | None, typer.Option(
        help="train.engine: torch, or numpy (visrec.ref's layers and update rules; models linear, mlp, fc_net, "
             "convnet3; CPU).",
    )] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue this stopped run; takes no other option.")] = None,
    nproc: Annotated[int | None, typer.Option(
        help="Train across N processes of this machine, started by torch's launcher (torchrun --standalone); "
             "train.batch_size stays the global batch. Several machines: see the README (torchrun --nnodes).",
    )] = None,
    max_restarts: Annotated[int, typer.Option(
        help="With --nproc: torchrun restarts the processes up to this many times after a failure; they resume "
             "from the last checkpoint.",
    )] = 0,
    progress: ProgressOpt = None,
    as_json: JsonOpt = False,
    monitor: Annotated[bool, typer.Option(
        "--monitor", help="Watch activations, gradients and update ratios; print the doctor's findings at the end.",
    )] = False,
    monitor_every: Annotated[int | None, typer.Option(help="With --monitor: sample every N steps.")] = None,
    weights: Annotated[Path | None, typer.Option(
        help="model.weights: start from this .safetensors or .pt state_dict (a different head is re-initialized).",
    )] = None,
    trust_checkpoint: Annotated[bool, typer.Option(
        "--trust-checkpoint", help="Allow a .pt weight file that needs full unpickling, which runs code from it.",
    )] = False,
    checkpoint_every: Annotated[int | None, typer.Option(
        help="train.checkpoint_every: also save a resumable checkpoint every N steps (mid-epoch).",
    )] = None,
    seeds: Annotated[str | None, typer.Option(
        help="Train one member per seed (e.g. 1,2,3) into OUT-seedN folders, for `visrec ensemble`.",
    )] = None,
    skip_bad_images: Annotated[bool, typer.Option(
        "--skip-bad-images", help="data.skip_bad_images: leave unreadable images out (listed in the run folder).",
    )] = False,
    style: Annotated[Path | None, typer.Option(
        help="task.style: with --task style, the style image the network learns.")] = None,
) -> None:
    """Train a model; writes a run folder with config, metrics, checkpoints, TensorBoard events and summary."""
    if nproc is not None and nproc > 1 and "LOCAL_RANK" not in os.environ:
        _launch(nproc, max_restarts, resume is None and out_dir is None, dataset, model)
        return
    from .fit import Trainer, train_seeds
    from .training import NonFiniteLoss

    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if resume is None and restarts and out_dir is not None and (out_dir / "checkpoints" / "last.json").is_file():
        err.print(f"restart {restarts} of the processes: resuming {out_dir} from its last checkpoint")
        run = Trainer.resume(out_dir, progress=progress).fit()  # torchrun restarted us: continue, never restart
        if os.environ.get("RANK", "0") == "0":
            _print_run(run, as_json)
        return
    if dataset is None and resume is None and not preset and not any(o.startswith("data.name=") for o in set_ or []):
        raise VisrecError("visrec train needs a DATASET", "for example: visrec train fashion-mnist (the catalog: "
                          "visrec datasets; your images: visrec train folder:PATH); visrec train --help lists options")

    def observers(_seed: int | None = None) -> list:
        if not monitor:
            return []
        from .doctor import TrainingMonitor

        return [TrainingMonitor(monitor_every, console=err)]

    def announce(trainer: Trainer) -> None:
        if not trainer.dist.main:  # across processes rank 0 speaks for all
            return
        ds, cfg = trainer.ds, trainer.cfg
        err.print(f"{ds!r} from {ds.source}")
        if ds.splits.get("skipped_images"):
            n = ds.splits["skipped_images"]["count"]
            err.print(f"[yellow]skipped {n} bad image file(s)[/yellow]: see {trainer.run_dir}/skipped_images.txt")
        err.print(f"model {cfg.model.name}: {trainer.params:,} parameters; {trainer.runtime!r}; "
                  f"run folder {trainer.run_dir}")
        if trainer.initial_weights_note:
            err.print(trainer.initial_weights_note)
        for note in trainer.notes:
            err.print(f"note: {note}")
        for w in trainer.warnings:
            err.print(f"[yellow]warning:[/yellow] {w}")

    try:
        if resume is not None:
            given = {"DATASET": dataset, "--model": model, "--task": task, "--preset": preset, "--set": set_,
                     "--epochs": epochs, "--batch-size": batch_size, "--lr": lr, "--seed": seed, "--out": out_dir,
                     "--data-dir": data_dir, "--device": device, "--engine": engine, "--weights": weights,
                     "--trust-checkpoint": trust_checkpoint, "--skip-bad-images": skip_bad_images,
                     "--checkpoint-every": checkpoint_every, "--seeds": seeds, "--style": style}
            extra = [k for k, v in given.items() if v]
            if extra:
                raise VisrecError(f"--resume takes no other option (got {', '.join(extra)})",
                                  "the run folder holds its whole config; start a new run to change it")
            trainer = Trainer.resume(resume, progress=progress, callbacks=observers())
            err.print(f"resuming {resume} at step {trainer.pos.step} (epoch {trainer.pos.epoch + 1})")
            run = trainer.fit()
        else:
            cfg = _config(preset, set_, data_name=dataset, model_name=model, task_name=task, train_epochs=epochs,
                          train_batch_size=batch_size, optim_lr=lr, train_seed=seed, data_data_dir=data_dir,
                          device_name=device, model_weights=weights, model_trust_checkpoint=trust_checkpoint or None,
                          data_skip_bad_images=skip_bad_images or None, train_checkpoint_every=checkpoint_every,
                          train_engine=engine, task_style=str(style.resolve()) if style else None)
            if seeds is not None:
                if seed is not None:
                    raise VisrecError("--seeds trains one run per seed: it does not go with --seed")
                try:
                    members = [int(v) for v in seeds.split(",") if v.strip()]
                except ValueError:
                    raise VisrecError(f"--seeds {seeds!r} is not a list of integers", "for example --seeds 1,2,3"
                                      ) from None
                done = train_seeds(cfg, members, out=out_dir, callbacks=observers, progress=progress,
                                   on_start=announce)
                for r in done:
                    _print_run(r, as_json)
                if len(done) < len(members) or done[-1].summary.get("status") == "interrupted":
                    raise typer.Exit(EXIT_INTERRUPTED)
                out.print(f"ensemble them with: visrec ensemble {' '.join(str(r.path) for r in done)}")
                return
            trainer = Trainer(cfg, out=out_dir, progress=progress, callbacks=observers())
            announce(trainer)
            run = trainer.fit()
    except NonFiniteLoss as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(EXIT_NONFINITE) from None
    if os.environ.get("RANK", "0") != "0":
        return
    _print_run(run, as_json)
    if run.summary.get("status") == "interrupted":
        raise typer.Exit(EXIT_INTERRUPTED)


def _launch(nproc: int, max_restarts: int, name_it: bool, dataset: str | None, model: str | None) -> None:
    """`visrec train ... --nproc N`: the same command in N processes, through torch.distributed.run (torchrun),
    with --nproc removed and, for a new run without --out, the folder named here so every process agrees."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a in ("--nproc", "--max-restarts"):
            skip = True
            continue
        if a.startswith(("--nproc=", "--max-restarts=")):
            continue
        args.append(a)
    if name_it:
        from .runs import default_run_name

        args += ["--out", str(Path("runs") / default_run_name(dataset or "run", model or "convnet"))]
    # torchrun would leave each process one thread and warn; share the cores instead (the loop does the same)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc)))
    err.print(f"starting {nproc} processes (torchrun --standalone --nproc-per-node {nproc}"
              + (f" --max-restarts {max_restarts}" if max_restarts else "") + ")")
    try:
        torchrun(["--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}", "-m", "visrec",
                  *args])
    except ChildFailedError as e:
        ranks = ", ".join(f"rank {r} (exit code {f.exitcode})" for r, f in sorted(e.failures.items()))
        raise VisrecError(f"training across {nproc} processes failed: {ranks}",
                          "the first error is in that rank's output above; the run resumes from its last "
                          "checkpoint with --resume RUN (in any number of processes)") from None


def _print_run(run, as_json: bool) -> None:
    """The end of a training command: the summary as JSON, or the task's primary numbers and where to look."""
    from .training.callbacks import format_metric

    s = run.summary
    if as_json:
        print(json.dumps(s, indent=2))
    if s.get("status") == "interrupted":
        err.print(f"stopped at step {s['steps']} ({s.get('error')}); the last checkpoint is saved.")
        err.print(f"continue with: visrec train --resume {run.path}")
        return
    if as_json:
        return
    p = s.get("primary_metric", "acc")
    if p == "acc":
        top5 = f" (top-5 {_pct(s.get('test_top5'))})" if (s.get("num_classes") or 0) > 5 else ""
        head = f"test accuracy {_pct(s.get('test_acc'))}{top5}, best val {_pct(s.get('best_val_acc'))}"
    else:
        head = f"test {p} {format_metric(p, s.get(f'test_{p}'))}, best val {format_metric(p, s.get(f'best_val_{p}'))}"
    out.print(f"{head}, training time {s['train_seconds']:.1f} s ({s['images_per_s']:.0f} images/s)")
    for w in s.get("warnings", []):
        err.print(f"[yellow]warning:[/yellow] {w}")
    out.print(f"run folder: {run.path}")
    if (run.path / "report.html").is_file():
        out.print(f"report: {run.path / 'report.html'}")
    out.print(f"TensorBoard: tensorboard --logdir {run.path / 'tb'}")


@app.command("ensemble")
def ensemble_cmd(
    members: Annotated[list[str], typer.Argument(
        help="Run folders, each optionally :last, :best or :snapshotK; RUN:snapshots for all of a run's snapshots.")],
    split: Annotated[str, typer.Option(help="test or val.")] = "test",
    tta: Annotated[str | None, typer.Option(help="One TTA mode for all members (default: each run's own).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate members and their probability average, majority vote and (checkpoints of one run) weight average."""
    from .ensemble import ensemble

    report = ensemble(members, split, tta=tta)
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        return
    t = Table("member / combination", f"{split} accuracy", "vs best member", title="ensemble")
    for m in report.members:
        t.add_row(m["member"], _pct(m["acc"]), "")
    for name, acc in report.combined.items():
        t.add_row(name, _pct(acc), f"{(acc - report.best_member_acc) * 100:+.2f} pts")
    out.print(t)


@app.command()
def finetune(
    source: Annotated[str, typer.Argument(help="Run folder (RUN, RUN:best), weight file (with --model) or timm:NAME.")],
    dataset: Annotated[str, typer.Argument(help="Dataset to transfer to: name, folder:PATH, ... or a folder's path.",
                                           callback=_dataset_source)],
    strategy: Annotated[str, typer.Option(help="linear, last, full or two_stage.")] = "last",
    model: Annotated[str | None, typer.Option(help="Architecture of a weight file.")] = None,
    stages: Annotated[int | None, typer.Option(help="finetune.stages: (last) final stages that train.")] = None,
    backbone_lr: Annotated[float | None, typer.Option(help="finetune.backbone_lr: stage lr / head lr.")] = None,
    preset: Annotated[str | None, typer.Option(help="Preset for the rest (default: the default recipe).")] = None,
    set_: SetOpt = None,
    epochs: Annotated[int | None, typer.Option(help="train.epochs")] = None,
    lr: Annotated[float | None, typer.Option(help="optim.lr (the head's; stages get less)")] = None,
    out_dir: Annotated[Path | None, out_option("Run folder.")] = None,
    progress: ProgressOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Transfer a trained network to new data: linear classifier on cached features, last stages, or everything."""
    from .fit import Trainer
    from .transfer import finetune_config

    overrides = list(set_ or [])
    for key, value in (("finetune.stages", stages), ("finetune.backbone_lr", backbone_lr), ("train.epochs", epochs),
                       ("optim.lr", lr)):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = finetune_config(source, dataset, strategy, model=model, preset=preset, overrides=overrides)
    trainer = Trainer(cfg, out=out_dir, progress=progress)
    err.print(f"{trainer.ds!r}; {trainer.initial_weights_note or 'weights: ' + cfg.model.name}")
    err.print(f"strategy {strategy}: {trainer.finetune.describe()}; run folder {trainer.run_dir}")
    s = trainer.fit().summary
    if as_json:
        print(json.dumps(s, indent=2))
        return
    out.print(f"test accuracy {_pct(s['test_acc'])}, best val {_pct(s['best_val_acc'])}, training time "
              f"{s['train_seconds']:.1f} s; run folder: {trainer.run_dir}")


@app.command()
def distill(
    teachers: Annotated[list[str], typer.Argument(help="Teacher run folders (RUN, RUN:best, ...).")],
    model: Annotated[str | None, typer.Option(help="Student architecture (default: the first teacher's).")] = None,
    temperature: Annotated[float | None, typer.Option(help="distill.temperature (default 4).")] = None,
    alpha: Annotated[float | None, typer.Option(help="distill.alpha: soft-target weight (default 0.5).")] = None,
    preset: Annotated[str | None, typer.Option(help="Recipe of the student (default: the first teacher's).")] = None,
    set_: SetOpt = None,
    epochs: Annotated[int | None, typer.Option(help="train.epochs")] = None,
    seed: Annotated[int | None, typer.Option(help="train.seed")] = None,
    out_dir: Annotated[Path | None, out_option("Run folder of the student.")] = None,
    progress: ProgressOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train one student on the soft predictions of an ensemble of teachers (and the labels)."""
    from .config import resolve_config
    from .fit import Trainer
    from .runs import RunRef

    first = RunRef.parse(teachers[0]).run.config
    base = resolve_config(preset) if preset else first
    base.data = first.data  # the teachers' data, splits and preprocessing (an explicit --set still wins)
    base.distill.teachers = list(teachers)
    base.model.weights, base.finetune.strategy = "", "none"
    cfg = _config(None, set_, base=base, model_name=model, distill_temperature=temperature, distill_alpha=alpha,
                  train_epochs=epochs, train_seed=seed)
    trainer = Trainer(cfg, out=out_dir, progress=progress)
    err.print(f"student {cfg.model.name} ({trainer.params:,} parameters) learns from {len(teachers)} teacher(s) at "
              f"T={cfg.distill.temperature:g}, alpha={cfg.distill.alpha:g}; run folder {trainer.run_dir}")
    s = trainer.fit().summary
    if as_json:
        print(json.dumps(s, indent=2))
        return
    out.print(f"student test accuracy {_pct(s['test_acc'])} in {s['train_seconds']:.1f} s; run folder: "
              f"{trainer.run_dir}")


@app.command()
def tune(
    dataset: DatasetArg = None,
    space: Annotated[Path | None, typer.Option(help="Search space YAML (default: lr, weight decay, label "
                                                    "smoothing, batch size).")] = None,
    trials: Annotated[int, typer.Option(help="Number of trials.")] = 20,
    workers: Annotated[int, typer.Option(help="Worker processes on this machine.")] = 1,
    strategy: Annotated[str, typer.Option(help="random, grid, tpe or coarse-to-fine.")] = "random",
    epochs: Annotated[int | None, typer.Option(help="Epochs per trial (coarse-to-fine: a third in the coarse "
                                                    "stage).")] = None,
    model: ModelOpt = None,
    task: TaskOpt = None,
    preset: Annotated[str | None, typer.Option(help="Preset every trial starts from.")] = None,
    set_: SetOpt = None,
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL (default: sqlite file in the study "
                                                     "folder; postgresql+psycopg2://... for many machines).")] = None,
    study: Annotated[str | None, typer.Option(help="Study name (default: DATASET-MODEL).")] = None,
    out_dir: Annotated[Path | None, out_option("Study folder (default runs/tune-STUDY).")] = None,
    pruner: Annotated[str, typer.Option(help="median, asha or none (on validation accuracy per epoch).")] = "median",
    seed: Annotated[int, typer.Option(help="Seed of the parameter draws.")] = 0,
    heartbeat: Annotated[int, typer.Option(help="Seconds between worker heartbeats; a silent worker's trial is "
                                                "retried after twice that.")] = 10,
    final: Annotated[bool, typer.Option("--final", help="Then retrain the best config and evaluate on test once.")
                     ] = False,
    show: Annotated[str | None, typer.Option(help="Print the leaderboard of this study (folder or name) and "
                                                  "exit.")] = None,
    join: Annotated[bool, typer.Option("--join", help="Join the study at --storage/--study as one more worker.")
                    ] = False,
) -> None:
    """Hyperparameter search: random in log space, grid, TPE or coarse-to-fine, on Optuna, with parallel workers."""
    from . import tune as T

    if show is not None or join:
        spec = _find_study(show, storage, study)
        if join:
            n = T.Worker(spec, index=os.getpid(), out=out_dir, announce=True).run()
            err.print(f"this worker ran {n} trial(s) of study {spec.name}")
        _print_leaderboard(spec)
        return
    if dataset is None:
        raise VisrecError("give the DATASET to search on", "for example: visrec tune fashion-mnist --trials 20")
    spec = T.create_study(dataset, space=space, trials=trials, strategy=strategy, epochs=epochs, model=model,
                          preset=preset, overrides=[*(set_ or []), *([f"task.name={task}"] if task else [])],
                          storage=storage, study=study, out=out_dir,
                          pruner=pruner, seed=seed, heartbeat=heartbeat)
    if spec.previous_trials:
        err.print(f"study {spec.name} already holds {spec.previous_trials} trial(s): adding {trials} with new "
                  "draws; the leaderboard covers them all (choose another --study for a fresh search)")
    err.print(f"study {spec.name}: {trials} trial(s), {strategy}, {workers} worker(s); folder {spec.folder}; "
              f"storage {spec.storage}")
    T.run_workers(spec, workers, announce=True)
    result = T.write_results(spec)
    _print_leaderboard(spec)
    for w in result["warnings"]:
        err.print(f"[yellow]warning:[/yellow] {w}")
    out.print(f"results: {spec.folder}/trials.csv, best.yaml (visrec train --preset {spec.folder}/best.yaml), "
              "scatter.png, progress.png")
    if final:
        run = T.final(spec)
        from .training.callbacks import format_metric

        p = run.summary["primary_metric"]
        name = "accuracy" if p == "acc" else p
        out.print(f"final: the best config retrained: test {name} {format_metric(p, run.summary.get(f'test_{p}'))} "
                  f"(val {format_metric(p, run.summary.get(f'val_{p}'))}); run folder {run.path}")


def _find_study(show: str | None, storage: str | None, study: str | None):
    from . import tune as T

    if show is not None and (Path(show) / "study.json").is_file():
        doc = json.loads((Path(show) / "study.json").read_text())
        return T.load_spec(storage or doc["storage"], doc["name"])
    name = show or study
    if not name:
        raise VisrecError("name the study", "--show FOLDER_OR_NAME, or --join with --storage URL --study NAME")
    folder = Path("runs") / f"tune-{name}"
    if storage is None and (folder / "study.json").is_file():
        storage = json.loads((folder / "study.json").read_text())["storage"]
    if storage is None:
        raise VisrecError(f"no study folder {show or folder} with a study.json", "give the folder, or --storage URL")
    return T.load_spec(storage, name)


def _print_leaderboard(spec) -> None:
    from . import tune as T

    rows = T.leaderboard(spec)
    keys = list(spec.space)
    staged = spec.strategy == "coarse-to-fine"
    t = Table(title=f"study {spec.name} ({spec.strategy})")
    from .training.callbacks import format_metric

    metric = spec.objective()[0]
    for col in ("#", *(["stage"] if staged else []), f"val {metric}", "ep", *(k.split(".")[-1] for k in keys), "s"):
        t.add_column(col, overflow="fold")
    for r in rows:  # `value` holds each trial's value of the task's primary metric
        t.add_row(str(r["number"]), *([r["stage"]] if staged else []), format_metric(metric, r["value"]),
                  str(r["epochs"]),
                  *[f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k)) for k in keys],
                  str(r["seconds"]))
    out.print(t)
    states = {}
    for r in T.trial_rows(spec):
        states[r["state"]] = states.get(r["state"], 0) + 1
    out.print("trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())))


@app.command()
def explain(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    images: Annotated[list[Path] | None, typer.Argument(
        help="Image files, or folders of them (default: test images of each class).")] = None,
    method: Annotated[str, typer.Option(help="filters, activations, errors, confused, tsne, neighbors, class_model, "
                                             "fooling, inversion, saliency, smoothgrad, guided_backprop, gradcam "
                                             "or occlusion.")] = "gradcam",
    class_: Annotated[str | None, typer.Option("--class", help="Class name or index (default: the predicted one).")
                      ] = None,
    n: Annotated[int, typer.Option(help="How many test images when none are given.")] = 8,
    layer: Annotated[str | None, typer.Option(help="gradcam: module path (default: the last feature map); "
                                                   "inversion: one stage (default: every stage).")] = None,
    out_dir: Annotated[Path | None, out_option("Folder for the PNGs (default RUN/explain).")] = None,
    resize: Annotated[bool | None, typer.Option(
        "--resize/--no-resize", help="Resize images to the model's input size (default: as training did).")] = None,
    convert: Annotated[bool | None, typer.Option(
        "--convert/--no-convert", help="Convert color images for a grayscale model (default: as training did).")
    ] = None,
) -> None:
    """Explain a run's model: filters, activations, attribution maps, errors, feature space, synthesized images.

    --class picks the explained class (attribution maps), the class drawn (class_model) or the target of the
    attack (fooling; default: each image's runner-up class)."""
    from .data.images import expand_image_paths
    from .explain import explain as run_explain

    files = [str(i) for i in expand_image_paths(images)] if images else None
    ex = run_explain(run, method, files, target=class_, n=n, layer=layer, out=out_dir, resize=resize, convert=convert)
    for f in ex.files:
        out.print(f"wrote {f}")


NetOpt = Annotated[str | None, typer.Option(
    "--net", help="Loss network: random_vgg, random_multiscale (offline defaults), vgg16:PATH or vgg19:PATH (a "
                  "torchvision weights file; vgg19-caffe:PATH for caffe-converted weights: BGR, 0..255), or a "
                  "classification run folder (layers stage1, stage2, ...).")]
StepsOpt = Annotated[int, typer.Option(help="Optimization steps (L-BFGS iterations or Adam steps).")]
MaxPixelsOpt = Annotated[int | None, typer.Option(
    help="Images with more pixels are refused as decompression bombs (default 89,478,485).")]
TrustOpt = Annotated[bool, typer.Option(
    "--trust-checkpoint", help="Allow a .pt weight file that needs full unpickling, which runs code from it.")]
OptimizerOpt = Annotated[str, typer.Option(help="lbfgs or adam.")]
LrOpt = Annotated[float | None, typer.Option(help="Step size (default: 1 for lbfgs, 0.02 for adam).")]
LayersOpt = Annotated[str | None, typer.Option(help="Comma-separated (default: the network's).")]


def _layers(text: str | None) -> list[str] | None:
    return [v.strip() for v in text.split(",") if v.strip()] if text else None


def _synthesis_options(progress: bool | None, max_pixels: int | None, trust: bool) -> dict:
    """The options every synthesis command passes through: the progress bar, the pixel limit, trust."""
    return {"progress": progress if progress is not None else err.is_terminal, "max_pixels": max_pixels,
            "trust": trust}


def _wrote(result, path: Path) -> None:
    result.save(path)
    losses = ", ".join(f"{k} {v:.4g}" for k, v in result.losses.items())
    out.print(f"wrote {path} and {path.with_suffix('.json')} ({result.seconds:.1f} s{'; ' + losses if losses else ''})")


@app.command()
def stylize(
    images: Annotated[list[Path], typer.Argument(
        help="CONTENT STYLE (optimization), or with --model: one or more content images, or folders of them.")],
    model: Annotated[Path | None, typer.Option(
        "--model", help="A fast style run (visrec train folder:PHOTOS --task style --style S.jpg): one forward pass "
                        "per image.")] = None,
    net: NetOpt = None,
    size: Annotated[int | None, typer.Option(
        help="Longer side of the output in pixels, aspect kept (default 512; with --model: the image's own).")] = None,
    style_size: Annotated[int | None, typer.Option(help="Longer side of the style image (default: --size).")] = None,
    steps: StepsOpt = 300,
    optimizer: OptimizerOpt = "lbfgs",
    lr: LrOpt = None,
    init: Annotated[str, typer.Option(help="Start from the content image or from noise.")] = "content",
    content_weight: Annotated[float, typer.Option(help="Weight of the content loss.")] = 1.0,
    style_weight: Annotated[float, typer.Option(help="Weight of the style (Gram) loss.")] = 5.0,
    tv_weight: Annotated[float, typer.Option(help="Weight of the total-variation loss.")] = 1.0,
    content_layers: LayersOpt = None,
    style_layers: LayersOpt = None,
    scales: Annotated[int, typer.Option(help="Coarse to fine: optimize at 1/2^(k-1) .. 1 of --size.")] = 1,
    preserve_color: Annotated[bool, typer.Option(
        "--preserve-color", help="Transfer luminance only and keep the content's colours.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the noise and the random loss networks.")] = 0,
    out_path: Annotated[Path | None, out_option(
        "Output PNG (a JSON of the settings and losses is written beside it); with several images, a folder.")] = None,
    max_pixels: MaxPixelsOpt = None,
    trust_checkpoint: TrustOpt = False,
    progress: ProgressOpt = None,
) -> None:
    """Neural style transfer: the content image painted in the style image's manner, by optimization (Gatys et
    al.) or, with --model, by a trained fast style network (Johnson et al.)."""
    from .synthesis import default_out, stylize_with_run
    from .synthesis import stylize as run_stylize

    if model is not None:
        if net is not None:
            raise VisrecError("--net is for stylizing by optimization; a --model run has its own network",
                              "leave out --net")
        from .data.images import expand_image_paths

        images = expand_image_paths(images)
        results = stylize_with_run(model, images, size=size, max_pixels=max_pixels)
        for image, r in zip(images, results, strict=True):
            if out_path is not None and len(images) == 1 and out_path.suffix.lower() == ".png":
                path = out_path
            else:
                path = (out_path or Path(".")) / default_out(image, suffix="stylized")
            _wrote(r, path)
        return
    if len(images) != 2:
        raise VisrecError(f"visrec stylize takes CONTENT STYLE (got {len(images)} image(s))",
                          "give the content image then the style image, or --model RUN to use a fast style run")
    content, style = images
    r = run_stylize(content, style, net=net or "random_vgg", size=size or 512, style_size=style_size, steps=steps,
                    optimizer=optimizer, lr=lr, init=init, content_weight=content_weight, style_weight=style_weight,
                    tv_weight=tv_weight, content_layers=_layers(content_layers), style_layers=_layers(style_layers),
                    scales=scales, preserve_color=preserve_color, seed=seed,
                    **_synthesis_options(progress, max_pixels, trust_checkpoint))
    _wrote(r, out_path or default_out(content, style, suffix="stylized"))


@app.command()
def texture(
    style: Annotated[Path, typer.Argument(help="The texture's example image.")],
    net: NetOpt = None,
    size: Annotated[int, typer.Option(help="Side of the square texture in pixels.")] = 256,
    style_size: Annotated[int | None, typer.Option(help="Longer side of the example (default: --size).")] = None,
    steps: StepsOpt = 300,
    optimizer: OptimizerOpt = "lbfgs",
    lr: LrOpt = None,
    style_layers: LayersOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the starting noise and the random loss networks.")] = 0,
    out_path: Annotated[Path | None, out_option("Output PNG (and its JSON beside it).")] = None,
    max_pixels: MaxPixelsOpt = None,
    trust_checkpoint: TrustOpt = False,
    progress: ProgressOpt = None,
) -> None:
    """Texture synthesis: a new image with the example's Gram statistics, from noise (Gatys et al. 2015)."""
    from .synthesis import default_out
    from .synthesis import texture as run_texture

    r = run_texture(style, net=net or "random_multiscale", size=size, style_size=style_size, steps=steps,
                    optimizer=optimizer, lr=lr, style_layers=_layers(style_layers), seed=seed,
                    **_synthesis_options(progress, max_pixels, trust_checkpoint))
    _wrote(r, out_path or default_out(style, suffix="texture"))


@app.command()
def dream(
    image: Annotated[Path, typer.Argument(help="The image to dream on.")],
    net: NetOpt = None,
    layer: Annotated[str | None, typer.Option(help="The layer whose activations grow (default: the network's "
                                                   "dream layer; a wrong name lists the valid ones).")] = None,
    size: Annotated[int, typer.Option(help="Longer side in pixels, aspect kept.")] = 512,
    octaves: Annotated[int, typer.Option(help="Scales, coarse to fine.")] = 4,
    octave_scale: Annotated[float, typer.Option(help="Size ratio between octaves.")] = 1.4,
    steps: Annotated[int, typer.Option(help="Gradient-ascent steps per octave.")] = 20,
    lr: Annotated[float, typer.Option(help="Step size (gradients normalized by their mean magnitude).")] = 0.01,
    jitter: Annotated[int, typer.Option(help="Largest random shift in pixels before each step.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the jitter and the random loss networks.")] = 0,
    out_path: Annotated[Path | None, out_option("Output PNG (and its JSON beside it).")] = None,
    max_pixels: MaxPixelsOpt = None,
    trust_checkpoint: TrustOpt = False,
    progress: ProgressOpt = None,
) -> None:
    """DeepDream: amplify what a layer of a network sees in an image (octaves, jitter, normalized gradients)."""
    from .synthesis import default_out
    from .synthesis import dream as run_dream

    r = run_dream(image, net=net or "random_vgg", layer=layer, size=size, octaves=octaves, octave_scale=octave_scale,
                  steps=steps, lr=lr, jitter=jitter, seed=seed, **_synthesis_options(progress, max_pixels,
                                                                                     trust_checkpoint))
    _wrote(r, out_path or default_out(image, suffix="dream"))


@app.command()
def sample(
    run: Annotated[Path, typer.Argument(help="A generate run folder (visrec train DATA --task generate).")],
    n: Annotated[int, typer.Option("--n", help="How many samples.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the noise: the same seed draws the same samples.")] = 0,
    steps: Annotated[int | None, typer.Option(
        help="Diffusion runs: DDIM steps (default: every diffusion step, ancestral sampling).")] = None,
    checkpoint: Annotated[str, typer.Option(help="auto, last or best.")] = "auto",
    out_path: Annotated[Path | None, out_option(
        "Grid PNG (the samples go in a .npz beside it; default RUN/samples/sample-seedS.png).")] = None,
) -> None:
    """Draw new images from a generative run: a grid PNG and the uint8 samples (N, C, H, W) as .npz."""
    from .tasks.generate import sample_run

    png, npz, seconds = sample_run(run, n, seed=seed, steps=steps, out=out_path, which=checkpoint)
    out.print(f"wrote {png} and {npz} ({n} samples in {seconds:.1f} s, {seconds / n * 1000:.1f} ms each)")


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    out_file: Annotated[Path | None, out_option("HTML file (default RUN/report.html).")] = None,
    explain: Annotated[bool, typer.Option("--explain/--no-explain",
                                          help="Include the sections that need the model and the test data.")] = True,
) -> None:
    """Write a run's self-contained report.html: curves, confusion, per-class, errors, filters, Grad-CAM, doctor."""
    from .report import build_report

    rep = build_report(run, out_file, explain=explain)
    for item in rep.skipped:
        err.print(f"left out: {item}")
    out.print(f"wrote {rep.path} ({rep.path.stat().st_size / 1e6:.1f} MB, {rep.seconds:.1f} s)")


@app.command()
def doctor(
    dataset: DatasetArg = None,
    model: ModelOpt = None,
    task: TaskOpt = None,
    preset: PresetOpt = None,
    set_: SetOpt = None,
    lr: Annotated[float | None, typer.Option(help="optim.lr")] = None,
    batch_size: Annotated[int | None, typer.Option(help="train.batch_size")] = None,
    out_dir: Annotated[Path | None, out_option("Folder for doctor.md, findings.json, plots and the trial run.")] = None,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = None,
    checks: Annotated[str | None, typer.Option(help="Comma-separated subset of the checks (default: all).")] = None,
    fast: Annotated[bool, typer.Option("--fast", help="Smaller experiments (about 4x quicker, less precise).")] = False,
    as_json: JsonOpt = False,
    fail_on: Annotated[str, typer.Option(help="Exit 1 when a finding reaches this severity: warn, error, never.")]
    = "never",
) -> None:
    """Examine a training setup (the config `visrec train` would use) and say what is wrong and what to change."""
    from .doctor import SEVERITIES, ExamOptions, examine

    if fail_on not in ("warn", "error", "never"):
        raise VisrecError(f"--fail-on {fail_on!r} is not valid", "use warn, error or never")
    cfg = _config(preset, set_, data_name=dataset, model_name=model, task_name=task, optim_lr=lr,
                  train_batch_size=batch_size, data_data_dir=data_dir, device_name=device)
    opts = ExamOptions(checks=tuple(c.strip() for c in checks.split(",") if c.strip()) if checks else None)
    if fast:
        opts.overfit_steps, opts.lr_steps, opts.lr_batch = 120, 60, 128
        opts.trial_images, opts.trial_val, opts.trial_epochs = 2000, 500, 2
    diag = examine(config=cfg, out=out_dir, options=opts, console=None if as_json else err)
    if as_json:
        print(diag.to_json())
    else:
        diag.print(out)
        out.print(f"report: {diag.out / 'doctor.md'}")
    if fail_on != "never" and SEVERITIES.index(diag.worst) >= SEVERITIES.index(fail_on):
        raise typer.Exit(1)


def _floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise VisrecError(f"{option} {text!r} is not a comma-separated list of numbers",
                          f"e.g. {option} 1e-3,1e-2") from None


@app.command()
def baseline(
    dataset: Annotated[str, typer.Argument(help="Dataset name, folder:PATH, synthetic[:k=v,...] or a folder's path.",
                                           callback=_dataset_source)],
    method: Annotated[str, typer.Option(help="knn, svm, softmax or twolayer.")] = "knn",
    features: Annotated[str, typer.Option(help="raw, hog, color or hog+color.")] = "raw",
    k: Annotated[str, typer.Option("--k", help="kNN: values of k to cross-validate, e.g. 1,3,5,10.")] = "1,3,5,10",
    folds: Annotated[int, typer.Option(help="kNN: cross-validation folds.")] = 5,
    metric: Annotated[str, typer.Option(help="kNN distance: l2, l1 or cosine.")] = "l2",
    lr: Annotated[str | None, typer.Option(help="svm/softmax/twolayer: learning rates to search, e.g. 1e-3,1e-2.")]
    = None,
    reg: Annotated[str | None, typer.Option(help="Regularization strengths to search, e.g. 1e-4,1e-3.")] = None,
    epochs: Annotated[int, typer.Option(help="Epochs of the final training (learned methods).")] = 10,
    solver: Annotated[str, typer.Option(
        help="softmax: sgd (minibatches), or newton (full-batch Newton's method; small problems).")] = "sgd",
    subset: Annotated[int | None, typer.Option(help="Use a stratified subset of this many training images.")] = None,
    image_size: Annotated[int | None, typer.Option(
        help="Resize every image to this square size (an image folder of mixed sizes needs it).")] = None,
    data_dir: DataDirOpt = None,
    out_dir: Annotated[Path | None, out_option("Run folder (default runs/baseline-...).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """A classic baseline (kNN, SVM, softmax, two-layer net) with its model selection, into a run folder."""
    from .classic import baseline as run_baseline

    try:
        ks = [int(v) for v in k.split(",") if v.strip()]
    except ValueError:
        raise VisrecError(f"--k {k!r} is not a comma-separated list of integers", "e.g. --k 1,3,5,10") from None
    s = run_baseline(dataset, method=method, features=features, ks=ks, folds=folds, metric=metric,
                     lrs=_floats(lr, "--lr"), regs=_floats(reg, "--reg"), epochs=epochs, subset=subset,
                     data_dir=str(data_dir) if data_dir else None, out=out_dir, solver=solver, image_size=image_size)
    if as_json:
        print(json.dumps(s, indent=2))
        return
    t = Table("method", "features", "selected", "test accuracy", "seconds")
    chosen = (f"k={s['k']} ({s['metric']})" if method == "knn" else
              f"newton, {s['newton_steps']} steps, reg={s['reg']:g}" if solver == "newton" else
              f"lr={s['lr']:g} reg={s['reg']:g}")
    t.add_row(method, features, chosen, _pct(s["test_acc"]), f"{s['seconds']:.1f}")
    out.print(t)
    if "cv" in s:
        cv = Table("k", "cv accuracy (mean)", "std")
        for row in s["cv"]["table"]:
            cv.add_row(str(row["k"]), _pct(row["mean"]), f"{row['std']:.2%}")
        out.print(cv)
    if s.get("warning"):
        err.print(f"[yellow]warning:[/yellow] {s['warning']}")
    out.print(f"run folder: {s['run']}")


@app.command("eval")
def eval_(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    split: Annotated[str, typer.Option(help="test, val or train.")] = "test",
    tta: Annotated[str | None, typer.Option(help=(
        "none, flip, crops, crops+flip, scales, scales+flip or auto (default: the run's eval.tta); several "
        "separated by commas, or all, compare their accuracy and cost."))] = None,
    checkpoint: Annotated[str, typer.Option(help="auto, last, best or snapshotK.")] = "auto",
    data_dir: DataDirOpt = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    backend: BackendOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a run's model on a split of its dataset: accuracy, top-5, per-class, confusion."""
    from .runs import Run
    from .tasks import task_class

    r = Run(run)
    _backend_note(r, checkpoint, device, backend)
    if not task_class(r.config.task.name).tta_eval:  # the run's own task evaluates it
        from .fit import evaluate_run
        from .training.callbacks import format_metric

        if data_dir:
            raise VisrecError("--data-dir is for classification runs", "the run's config names its data")
        res = evaluate_run(run, split, which=checkpoint, device=device)
        if split == "test":  # the files training wrote of its test split, from these weights (COCO results, ...)
            res.save(r.path)
        if as_json:
            print(json.dumps(res.to_dict(), indent=2))
        else:
            out.print(f"{r.name} on {split} ({r.config.task.name}): "
                      + ", ".join(f"{k} {format_metric(k, v)}" for k, v in res.metrics.items()))
        return
    kw = {"which": checkpoint, "device": device, "data_dir": str(data_dir) if data_dir else None,
          "backend": backend}
    if tta is not None and ("," in tta or tta == "all"):
        rows = r.compare_tta(None if tta == "all" else [m.strip() for m in tta.split(",") if m.strip()], split, **kw)
        if as_json:
            print(json.dumps([row for row, _ in rows], indent=2))
            return
        base = rows[0][0]["seconds"] or 1e-9
        t = Table("tta", "views", f"{split} accuracy", "loss", "seconds", "cost", title=f"{r.name}: test-time "
                  "augmentation")
        for row, _ in rows:
            t.add_row(row["tta"], str(row["views"]), _pct(row["acc"]), f"{row['loss']:.4f}", f"{row['seconds']:.2f}",
                      f"{row['seconds'] / base:.1f}x")
        out.print(t)
        return
    res = r.evaluate(split, tta=tta, **kw)
    if as_json:
        print(json.dumps({**res.to_dict(), "confusion": res.confusion.tolist(), "classes": res.classes}, indent=2))
        return
    top5 = f", top-5 {res.top5:.2%}" if len(res.classes) > 5 else ""
    out.print(f"{r.name} on {split} (n={res.n}, tta={res.tta}, backend {res.backend}): accuracy {res.acc:.2%}{top5}, "
              f"loss {res.loss:.4f}")
    t = Table("class", "accuracy", "n")
    for name, acc, n in zip(res.classes, res.per_class_acc, res.confusion.sum(1).tolist(), strict=True):
        t.add_row(name, f"{acc:.2%}", str(n))
    out.print(t)
    if res.most_confused(3):
        out.print("most confused (true -> predicted): " +
                  "; ".join(f"{a} -> {b} ({n})" for a, b, n in res.most_confused(3)))


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    images: Annotated[list[Path], typer.Argument(help="Image files, or folders of them (read recursively).")],
    top_k: Annotated[int, typer.Option(help="How many classes to show per image.")] = 5,
    resize: Annotated[bool | None, typer.Option(
        "--resize/--no-resize", help="Resize images to the model's size (default: as training did).")] = None,
    convert: Annotated[bool | None, typer.Option(
        "--convert/--no-convert", help="Convert color images for a grayscale model (default: as training did).")
    ] = None,
    checkpoint: Annotated[str, typer.Option(help="auto, last or best.")] = "auto",
    max_pixels: Annotated[int | None, typer.Option(
        help="Images with more pixels are refused as decompression bombs (default: the run's data.max_pixels).")
    ] = None,
    output_format: Annotated[str | None, typer.Option(
        "--format", help="text, json, or coco (a COCO results file; detection and instance runs).")] = None,
    min_score: Annotated[float | None, typer.Option(
        help="Detection runs: the lowest score of an object kept (default 0.5; 0.05 for --format coco, the floor "
             "COCO's evaluation expects).")] = None,
    annotations: Annotated[Path | None, typer.Option(
        help="--format coco: a COCO annotation file whose image ids and category ids the results use, matched by "
             "file (default: the run's own COCO folder, when it has one).")] = None,
    beam: Annotated[int | None, typer.Option(
        help="Captioning runs: beam width (1 = greedy; default: the run's task.beam).")] = None,
    draw: Annotated[Path | None, typer.Option(
        help="Detection, instance, localization and segmentation runs: write each image with its boxes or masks "
             "as DIR/<name>.png.")] = None,
    backend: BackendOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Classify image files with a trained run, through its own input pipeline (decoding, channels, size and
    normalization as in training); a detection or instance run finds their objects, a localization run boxes its
    object, a segmentation run labels every pixel. Files that cannot be predicted are reported and the exit code
    is 1."""
    from .data.images import expand_image_paths
    from .io import write_bytes
    from .runs import Run

    images = expand_image_paths(images)
    fmt = output_format or ("json" if as_json else "text")
    from .tasks import task_class

    r = Run(run)
    kind = task_class(r.config.task.name).Predictor
    if kind is not None and fmt not in kind.formats:  # refused before the model loads
        raise VisrecError(f"--format {fmt} is not valid for {run}, a {r.config.task.name} run",
                          f"use {', '.join(kind.formats)}")
    if min_score is None and fmt == "coco":
        min_score = 0.05  # the floor COCO's evaluation expects
    p = r.predictor(which=checkpoint, backend=backend, resize=resize, convert=convert, max_pixels=max_pixels,
                    min_score=min_score, beam=beam)
    if p.backend_note:
        err.print(f"[yellow]note:[/yellow] {p.backend_note}")
    if annotations is not None and fmt != "coco":
        raise VisrecError("--annotations names the image ids of a COCO results file", "add --format coco"
                          if "coco" in p.formats else "leave out --annotations")
    if draw is not None and not p.draws:
        raise VisrecError(f"--draw: the predictions of {run} (a {r.config.task.name} run) have no drawing",
                          "leave out --draw")
    preds = p.predict([str(i) for i in images], top_k=top_k, errors="collect")
    bad = [x for x in preds if x.error]
    if draw is not None:
        for i, x in enumerate(preds):
            if x.error is None and x.answer is not None:
                stem = Path(x.source).stem if not x.source.startswith("<") else f"input{i}"
                write_bytes(draw / f"{stem}.png", x.answer.draw(x.item))
    if fmt not in ("text", "json"):
        print(p.write(fmt, preds, images, lambda text: err.print(text),
                      **({"annotations": annotations} if annotations is not None else {})))
    elif fmt == "json":
        print(json.dumps([x.to_json() for x in preds], indent=2))
    for x in preds:
        if x.error:
            err.print(f"[red]error:[/red] {x.error}")
        elif fmt == "text":
            out.print(f"{x.source}: {x.answer.text()}")
    if draw is not None and len(bad) < len(preds):
        err.print(f"drawn to {draw}/")
    if bad:
        err.print(f"{len(bad)} of {len(preds)} image(s) could not be predicted")
        raise typer.Exit(1)


def _backend_note(run, checkpoint: str, device: str, backend: str) -> None:
    """Say on stderr why `--backend auto` runs torch rather than onnxruntime, when it does; `--backend onnx` on a
    run it cannot serve fails here, with load_model's reason, before any other work."""
    from .tasks import task_class

    predictor = task_class(run.config.task.name).Predictor
    if backend == "torch" or predictor is None:
        return
    note = run.load_model(checkpoint, device, backend, outputs=predictor.outputs).backend_note
    if note:
        err.print(f"[yellow]note:[/yellow] {note}")


@app.command()
def models(
    input_shape: Annotated[str, typer.Option("--input", help="CxHxW the models are built for.")] = "3x224x224",
    classes: Annotated[int, typer.Option(help="Number of classes.")] = 1000,
    family: Annotated[str | None, typer.Option(help="Only this family (resnet, vgg, densenet, ...).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List registered models: name, family, parameters and multiply-accumulates at the given input."""
    from .models import list_models, model_entry
    from .models.summary import human, model_table, parse_shape

    shape = parse_shape(input_shape)
    names = list_models(family)
    if not names:
        families = sorted({model_entry(n).family for n in list_models()})
        raise VisrecError(f"--family {family!r} has no models", f"families: {', '.join(families)}")
    rows = model_table(names, shape, classes)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    t = Table("name", "family", "params", "MACs", "description", title=f"models at {input_shape}, {classes} classes")
    for r in rows:
        if "error" in r:
            t.add_row(r["name"], r["family"], "-", "-", r["error"])
        else:
            macs = "-" if r["macs"] is None else human(r["macs"])  # detectors: the proposals depend on the image
            t.add_row(r["name"], r["family"], human(r["params"]), macs, r["description"])
    out.print(t)


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    fmt: Annotated[str, typer.Option("--format", help="safetensors, onnx or torchscript.")] = "onnx",
    out_file: Annotated[Path | None, out_option("Output file (default RUN/export/model.*).")] = None,
    checkpoint: Annotated[str, typer.Option(help="auto, last or best.")] = "auto",
) -> None:
    """Export a run's model with its class names and preprocessing (ONNX/TorchScript take 0..255 pixels)."""
    from .export import export_run

    path = export_run(run, fmt, out_file, checkpoint)
    out.print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB)")


@app.command()
def serve(
    runs: Annotated[list[str], typer.Argument(
        help="Run folders to serve (the first answers by default); NAME=FOLDER names one for ?model=NAME.")],
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 opens it to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    token: Annotated[str | None, typer.Option(
        help="Require `Authorization: Bearer TOKEN` on the API and /metrics (default: $VISREC_TOKEN if set).",
        envvar="VISREC_TOKEN")] = None,
    max_batch: Annotated[int, typer.Option(help="Images per forward pass at most (1 turns batching off).")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="How long a request waits for others to join its batch.")] = 5.0,
    backend: Annotated[str, typer.Option(help="torch, channels_last, compile (torch.compile) or onnx (the network's "
                                              "ONNX graph through onnxruntime); detectors, captioning and style "
                                              "runs take torch.")] = "torch",
    max_bytes: Annotated[int, typer.Option(help="Largest request body in bytes.")] = 10 * 1024 * 1024,
    max_images: Annotated[int, typer.Option(help="Most images in one request.")] = 16,
    max_pixels: Annotated[int | None, typer.Option(
        help="Images whose header claims more pixels are refused unread (default: the run's data.max_pixels).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds a request may take before it gets 504.")] = 30.0,
    tta: Annotated[str | None, typer.Option(help="Test-time augmentation (default: the run's own eval.tta).")
                   ] = None,
    checkpoint: Annotated[str, typer.Option(help="auto, last or best.")] = "auto",
    min_score: Annotated[float, typer.Option(help="Detection runs: the lowest score of an object returned.")] = 0.5,
) -> None:
    """Serve trained runs: a JSON API (POST /v1/predict, GET /v1/models, /healthz, /readyz, /metrics) and a web
    page at / where a person drops photos and sees the predictions and why. Listens on 127.0.0.1 unless told
    otherwise; concurrent requests are batched into one forward pass; SIGTERM lets in-flight requests finish."""
    from .serve import ServeSettings
    from .serve import serve as run_server

    run_server([str(r) for r in runs], ServeSettings(
        host=host, port=port, token=token or None, max_batch=max_batch, max_wait_ms=max_wait_ms, backend=backend,
        max_bytes=max_bytes, max_images=max_images, max_pixels=max_pixels, timeout_s=timeout, tta=tta,
        which=checkpoint, min_score=min_score))


@app.command()
def validate(
    data: Annotated[str, typer.Argument(help="Image folder (PATH or folder:PATH), coco:PATH or yolo:PATH to scan.")],
    max_pixels: Annotated[int, typer.Option(help="Pixels above which an image is a decompression bomb.")] = 89_478_485,
    image_size: Annotated[int | None, typer.Option(
        help="The data.image_size training will use: images of several sizes are then resized, not an error.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Scan a dataset before training: an image folder (bad files, bombs, empty classes, leaks across splits, sizes
    training refuses) or COCO / YOLO annotations (missing images, bad boxes, unknown categories, duplicate ids, bad
    masks); exit 1 on errors, which are what training would fail on."""
    from .data.catalog import source_name
    from .data.validate import validate_folder, validate_objects

    data = source_name(data)
    report = (validate_objects(data, image_size) if data.startswith(("coco:", "yolo:"))
              else validate_folder(data, max_pixels, image_size))
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for split, counts in report.classes.items():
            out.print(f"{split}: {len(counts)} classes, {sum(counts.values())} images")
        style = {"error": "red", "warning": "yellow", "note": "dim"}
        for p in report.problems:
            out.print(f"[{style[p.severity]}]{p.severity:7s}[/] {p.kind:24s} {p.path}: {p.detail}", highlight=False)
        n = {s: sum(p.severity == s for p in report.problems) for s in style}
        out.print(f"{report.files} image files: {n['error']} errors, {n['warning']} warnings, {n['note']} notes"
                  + ("" if report.ok else " - training would fail on the errors above"))
    if not report.ok:
        raise typer.Exit(1)


@app.command("summary")
def summary_cmd(
    model: Annotated[str, typer.Argument(help="Model name (see `visrec models`).")],
    input_shape: Annotated[str, typer.Option("--input", help="CxHxW of one image.")] = "3x224x224",
    classes: Annotated[int, typer.Option(help="Number of classes.")] = 1000,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="Model option KEY=VALUE.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Per layer: output shape, parameters, multiply-accumulates and activation memory, with totals."""
    from .config import parse_override
    from .models.summary import model_summary, parse_shape

    opts = {}
    for item in option or []:
        if "=" not in item:
            raise VisrecError(f"--option {item!r} is not KEY=VALUE", "for example --option stem=small")
        key, value = parse_override(item)
        opts[key] = value
    s = model_summary(model, parse_shape(input_shape), classes, **opts)
    if as_json:
        print(json.dumps({"model": model, **s.to_json()}, indent=2))
    else:
        print(s)


@app.command()
def datasets(
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the dataset catalog: found or not, where, and size on disk."""
    from .data import dataset_status
    from .data.catalog import search_roots

    rows = dataset_status(data_dir)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    t = Table()
    for col in ("name", "found", "where", "size", "description"):  # names whole; the rest wrapped at spaces
        t.add_column(col, no_wrap=col in ("name", "found", "size"), overflow="fold")
    for r in rows:
        t.add_row(r["name"], "yes" if r["found"] else "[red]no[/red]", r["where"] or "-",
                  _human_bytes(r["bytes"]) if r["bytes"] else "-", r["description"])
    out.print(t)
    out.print("searched, in order: " + ", ".join(f"{p} ({why})" for p, why in search_roots(data_dir)))
    out.print("also: folder:PATH (one subfolder per class, optional train/ val/ test/), coco:PATH (annotations/"
              "instances_<split>.json, images beside them), yolo:PATH (data.yaml, images/ and labels/), wds:PATH "
              "(shards written by visrec data pack, local or an fsspec URL); a folder's "
              "path alone is read by its layout")


@data_app.command("fetch")
def data_fetch(
    name: Annotated[str, typer.Argument(help="Catalog dataset name.")],
    dest: Annotated[
        Path | None, typer.Option("--dir", help="Root folder to download into (default: the user cache).")
    ] = None,
) -> None:
    """Download a dataset from its official source into the cache, verifying checksums."""
    from .data import fetch

    where = fetch(name, dest)
    out.print(f"{name}: ready in {where}")


@data_app.command("where")
def data_where(
    name: Annotated[str, typer.Argument(help="Catalog dataset name.")],
    data_dir: DataDirOpt = None,
) -> None:
    """Print where a dataset's files are found; exit 1 if they are not."""
    from .data import locate

    found = locate(name, data_dir)
    if found is None:
        err.print(f"{name}: not found")
        raise typer.Exit(1)
    out.print(str(found))


@data_app.command("pack")
def data_pack(
    source: Annotated[str, typer.Argument(help="What to pack: an image folder (PATH or folder:PATH), coco:PATH or "
                                               "yolo:PATH.", callback=_dataset_source)],
    dest: Annotated[str, typer.Argument(help="Folder or fsspec URL (s3://, gs://, ...) the shards are written to.")],
    shard_size: Annotated[str, typer.Option(help="Bytes per shard at most (1GB, 500MB, ...).")] = "1GB",
    val_fraction: Annotated[float, typer.Option(help="data.val_fraction: held out of train for validation.")] = 0.1,
    test_fraction: Annotated[float, typer.Option(
        help="data.test_fraction: held out as test when the folder has no test/.")] = 0.2,
    split_seed: Annotated[int, typer.Option(help="data.split_seed: the seed of those splits.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the training samples' order in the shards.")] = 0,
) -> None:
    """Pack an image folder, or a COCO or YOLO folder, into WebDataset tar shards (train-NNNNNN.tar, val-, test-)
    and index.json, the splits made as training makes them; train on them with `visrec train wds:DEST`."""
    from .data.shards import pack

    index = pack(source, dest, shard_size, seed=seed, say=lambda m: err.print(m), val_fraction=val_fraction,
                 test_fraction=test_fraction, split_seed=split_seed)
    parts = [f"{k} {v['samples']:,} samples in {len(v['shards'])} shard(s)" for k, v in index["splits"].items()]
    if index.get("kind") == "objects":
        parts.append("each split's annotations in SPLIT.coco.json")
    out.print(f"packed {source} into {dest}: {'; '.join(parts)}; train with: visrec train wds:{dest}")


@data_app.command("cache")
def data_cache(
    clear: Annotated[bool, typer.Option("--clear", help="Remove every entry.")] = False,
    orphans: Annotated[bool, typer.Option(
        "--orphans", help="With --clear: only the entries whose image files are gone.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The decoded cache of image folders (data.cache=disk): each entry's size, images and files; --clear frees it
    (a later run decodes its folder again)."""
    from .data.decoded_cache import cache_entries, cache_folder, clear_cache

    if orphans and not clear:
        raise VisrecError("--orphans says which entries --clear removes", "add --clear")
    if clear:
        n, freed = clear_cache(only_orphans=orphans)
        out.print(f"removed {n} entr{'y' if n == 1 else 'ies'} ({_human_bytes(freed)}) from {cache_folder()}")
        return
    rows = cache_entries()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    t = Table()
    for col in ("images", "shape", "size", "first file", "files there"):
        t.add_column(col, no_wrap=col != "first file", overflow="fold")
    for r in rows:
        t.add_row(f"{r['files']:,}", "x".join(map(str, r["shape"] or [])), _human_bytes(r["bytes"]), str(r["first"]),
                  "yes" if r["files_present"] else "[red]no[/red]")
    out.print(t)
    total = sum(r["bytes"] for r in rows)
    out.print(f"{len(rows)} entries, {_human_bytes(total)} in {cache_folder()} (visrec data cache --clear frees it)")


@app.command()
def tasks(as_json: JsonOpt = False) -> None:
    """List the registered tasks: what each learns, its target and its primary metric."""
    import importlib

    from .tasks import TASKS

    def first_sentence(cls) -> str:
        text = " ".join((importlib.import_module(cls.__module__).__doc__ or cls.__doc__ or "").split())
        end = text.find(". ")
        return text[: end + 1] if end >= 0 else text

    rows = [{"task": name, "target": cls.target, "primary_metric": cls.primary, "description": first_sentence(cls)}
            for name, cls in TASKS.items()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    t = Table()
    for col in ("task", "target", "primary metric", "what it learns"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(r["task"], r["target"], r["primary_metric"], r["description"])
    out.print(t)


@app.command()
def presets() -> None:
    """List the shipped presets (use with --preset NAME)."""
    from .config import list_presets

    t = Table()
    t.add_column("preset", overflow="fold", no_wrap=True)
    t.add_column("what it is", overflow="fold")
    for name, desc in list_presets().items():
        t.add_row(name, desc)
    out.print(t)


@app.command()
def config(
    preset: PresetOpt = None,
    set_: SetOpt = None,
    keys: Annotated[bool, typer.Option("--keys", help="List every valid section.key.")] = False,
) -> None:
    """Print the resolved config (defaults, then preset, then --set) as YAML."""
    from .config import Config, choices

    if keys:
        every = Config().keys()
        for key in every:
            try:
                print(f"{key}  ({' | '.join(map(str, choices(key)))})")
            except KeyError:
                print(key)
        return
    print(_config(preset, set_).to_yaml(), end="")


@app.command()
def runs(root: Annotated[Path, typer.Argument(help="Folder of runs.")] = Path("runs")) -> None:
    """List run folders with their status, test metric (accuracy, or the task's primary metric) and training time;
    doctor examinations are marked as such."""
    from .runs import list_runs

    t = Table(title=None)
    t.add_column("run", overflow="fold")  # names to copy: wrapped, never cut
    for name in ("status", "model", "epochs", "test", "train s"):  # short values, never broken inside a word
        t.add_column(name, no_wrap=name != "status")
    for r in list_runs(root):
        s = r.summary
        status = "doctor report" if not s and (r.path / "doctor.md").is_file() else r.status
        t.add_row(r.name, status, s.get("model", "-"), str(s.get("epochs", "-")), _test_metric(s),
                  f"{s['train_seconds']:.1f}" if s.get("train_seconds") else "-")
    out.print(t)


def _test_metric(summary: dict) -> str:
    """A run's test result in a word: accuracy as a percentage, another task's primary metric by name."""
    from .training.callbacks import format_metric

    primary = summary.get("primary_metric", "acc")
    value = format_metric(primary, summary.get(f"test_{primary}"))
    return value if primary == "acc" or value == "-" else f"{primary} {value}"


def main() -> None:
    try:
        app()
    except VisrecError as e:
        err.print(f"[red]error:[/red] {escape(e.message)}")  # messages quote user text: never markup
        if e.hint:
            err.print(f"  [yellow]hint:[/yellow] {escape(e.hint)}")
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
