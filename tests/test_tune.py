"""Hyperparameter search: sampling, spaces, coarse-to-fine, the blow-up rule, parallel workers, retries after a
killed worker, on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import contextlib
import glob
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from scipy import stats
from typer.testing import CliRunner

import visrec
from visrec.cli import app
from visrec.errors import VisrecError
from visrec.tune import (
    Worker,
    create_study,
    edge_warnings,
    grid_params,
    open_stage,
    parse_space,
    random_params,
    run_workers,
    trial_rows,
    write_results,
)

SYN = "synthetic:classes=4,size=12,train=384,test=128"
FAST = ["model.kwargs.widths=[8,16,16]", "train.batch_size=32", "train.min_epoch_steps=0"]
SPACE = {"optim.lr": {"loguniform": [0.02, 0.5]}, "optim.weight_decay": {"loguniform": [1e-5, 1e-3]}}


def test_loguniform_draws_are_uniform_in_log_space():
    params = parse_space({"optim.lr": {"loguniform": [1e-4, 1.0]}})
    draws = [p["optim.lr"] for p in random_params(params, 2000, seed=0)]
    logs = [math.log10(v) for v in draws]
    assert stats.kstest(logs, stats.uniform(loc=-4, scale=4).cdf).pvalue > 0.01
    assert stats.kstest(draws, stats.uniform(loc=1e-4, scale=1.0).cdf).pvalue < 1e-6  # not uniform in value
    assert 0.2 < sum(v < 1e-3 for v in draws) / len(draws) < 0.3  # a quarter of the decades lies below 1e-3


def test_space_mistakes_name_the_key_and_the_fix():
    cases = {
        "optim.lrr": ({"optim.lrr": {"uniform": [0, 1]}}, "lrr"),
        "empty": ({"optim.lr": {"uniform": [0.1, 0.1]}}, "is empty"),
        "reversed": ({"optim.lr": {"loguniform": [1.0, 0.1]}}, "above the high bound"),
        "nonpositive": ({"optim.weight_decay": {"loguniform": [0, 0.1]}}, "positive bounds"),
        "kind": ({"optim.lr": {"normal": [0, 1]}}, "normal"),
        "categorical": ({"train.batch_size": {"categorical": []}}, "non-empty list"),
        "type": ({"train.batch_size": {"categorical": ["big"]}}, "train.batch_size"),
    }
    for name, (space, needle) in cases.items():
        with pytest.raises(VisrecError, match=needle):
            parse_space(space)
        del name
    with pytest.raises(VisrecError) as e:
        parse_space({"optim.lr": {"loguniform": [1.0, 0.1]}})
    assert "swap" in e.value.hint
    with pytest.raises(VisrecError, match="cannot open the study storage postgresql") as e:
        create_study(SYN, space=SPACE, trials=2, storage="postgresql+psycopg2://nobody@127.0.0.1:1/none")
    assert "server" in e.value.hint


def test_grid_covers_the_range_and_edge_warnings():
    params = parse_space({"optim.lr": {"loguniform": [1e-3, 1e-1]}, "train.batch_size": {"categorical": [32, 64]}})
    pts = grid_params(params, 6, seed=0)
    assert len(pts) == 6 and len({tuple(p.values()) for p in pts}) == 6
    assert sorted({p["optim.lr"] for p in pts}) == pytest.approx([1e-3, 1e-2, 1e-1])  # 3 log-spaced x 2 choices
    warn = edge_warnings(params, {"optim.lr": 0.095, "train.batch_size": 32})
    assert len(warn) == 1 and "top of its range" in warn[0] and "optim.lr" in warn[0]
    assert edge_warnings(params, {"optim.lr": 1e-2}) == []


def test_coarse_to_fine_narrows_around_the_optimum(tmp_path):
    space = {"optim.lr": {"loguniform": [1e-5, 1.0]}, "optim.momentum": {"uniform": [0.0, 1.0]}}
    spec = create_study(SYN, space=space, trials=24, strategy="coarse-to-fine", out=tmp_path / "c2f", epochs=6,
                        seed=3)
    seen_epochs = []

    def objective(trial, values, epochs):  # a known optimum at lr = 1e-2, momentum = 0.8
        seen_epochs.append((trial.user_attrs["stage"], epochs))
        return -(math.log10(values["optim.lr"]) + 2) ** 2 - 4 * (values["optim.momentum"] - 0.8) ** 2

    assert Worker(spec, objective=objective).run(poll=0.05, coordinate=True) == 24
    fine = parse_space(open_stage(spec, spec.stages[1]).user_attrs["space"])
    lr, mom = fine
    assert lr.low < 1e-2 < lr.high and math.log10(lr.high / lr.low) < 0.6 * 5  # narrower than the 5 decades
    assert mom.low < 0.8 < mom.high and mom.high - mom.low < 0.6
    assert {e for s, e in seen_epochs if s == "coarse"} == {2} and {e for s, e in seen_epochs if s == "fine"} == {6}
    result = write_results(spec)
    assert result["best"]["stage"] == "fine" and abs(math.log10(result["best"]["params"]["optim.lr"]) + 2) < 0.5
    best = yaml.safe_load((tmp_path / "c2f" / "best.yaml").read_text())
    assert best["optim"]["lr"] == pytest.approx(result["best"]["params"]["optim.lr"])
    assert (tmp_path / "c2f" / "scatter.png").stat().st_size > 1000


def test_a_blowing_up_trial_stops_within_a_few_steps(tmp_path):
    spec = create_study(SYN, space={"optim.lr": {"categorical": [5000.0]}}, trials=1, epochs=5, out=tmp_path / "b",
                        overrides=FAST + ["optim.grad_clip=0"])
    Worker(spec).run(poll=0.05)
    (row,) = trial_rows(spec)
    assert row["state"] == "PRUNED" and ("3x the initial loss" in row["stopped"] or "non-finite" in row["stopped"])
    steps = [r["step"] for r in visrec.Run(row["run"]).metrics() if r["kind"] == "window"]
    assert max(steps, default=0) <= 10  # the first logged window (log_every is 10 in a search)


def test_cli_search_final_and_show(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    args = ["tune", SYN, "--space", str(space), "--trials", "3", "--epochs", "2", "--out", str(tmp_path / "s"),
            "--study", "cli", "--final", *sum((["--set", o] for o in FAST), [])]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "test accuracy" in r.output and (tmp_path / "s" / "final" / "summary.json").is_file()
    for row in trial_rows(visrec.tune.load_spec(f"sqlite:///{tmp_path / 's' / 'study.db'}", "cli")):
        run = visrec.Run(row["run"])
        assert run.summary["test_acc"] is None and not (run.path / "confusion.csv").exists()  # test untouched
    r = CliRunner().invoke(app, ["train", SYN, "--preset", str(tmp_path / "s" / "best.yaml"), "--epochs", "1",
                                 "--out", str(tmp_path / "again"), "--no-progress"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["tune", "--show", str(tmp_path / "s")])
    assert r.exit_code == 0 and "study cli" in r.output and "3 complete" in r.output.replace("pruned", "complete")


# ---------------------------------------------------------------- parallel workers, on SQLite and PostgreSQL

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of Debian's package on 127.0.0.1, started for these tests and stopped after."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql); `make test` installs it "
                    "where it can")
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install psycopg2-binary)")
    bindir = Path(found[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="visrec-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(root, "postgres", "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    data, log = root / "data", root / "server.log"
    subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-o",
                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        subprocess.run([*prefix, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                        "visrec"], check=True, capture_output=True)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/visrec"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return request.getfixturevalue("postgres_url")


def _complete(spec, n, queued):
    rows = trial_rows(spec)
    done = [r for r in rows if r["state"] in ("COMPLETE", "PRUNED")]
    params = [tuple(r[k] for k in SPACE) for r in done]
    assert len(done) == n and len(set(params)) == n  # every queued trial ran once: no duplicates, none lost
    assert sorted(params) == sorted(tuple(q[k] for k in SPACE) for q in queued)
    return rows


def test_two_workers_share_one_study(tmp_path, storage):
    name = f"two-{os.getpid()}-{time.monotonic_ns()}"
    spec = create_study(SYN, space=SPACE, trials=6, epochs=1, out=tmp_path / "w", overrides=FAST, storage=storage,
                        study=name, seed=1)
    run_workers(spec, 2, poll=0.2)
    _complete(spec, 6, random_params(parse_space(SPACE), 6, seed=1))


def test_a_killed_worker_leaves_its_trial_retried_and_the_study_complete(tmp_path, storage):
    name = f"kill-{os.getpid()}-{time.monotonic_ns()}"
    spec = create_study(SYN, space=SPACE, trials=3, epochs=20, out=tmp_path / "k", overrides=FAST, storage=storage,
                        study=name, seed=2, heartbeat=1)
    cmd = [sys.executable, "-m", "visrec.tune", "--storage", spec.storage, "--study", name]
    victim = subprocess.Popen([*cmd, "--index", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    study = open_stage(spec, name)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until it is training (its run folder has a metrics file)
        running = [t for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"]
        if running and Path(running[0].user_attrs.get("run", "/nonexistent"), "metrics.jsonl").is_file():
            break
        time.sleep(0.2)
    else:
        victim.kill()
        pytest.fail("the worker never started a trial")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed = running[0].number
    survivor = subprocess.run([*cmd, "--index", "1"], capture_output=True, text=True, timeout=600)
    assert survivor.returncode == 0, survivor.stderr[-2000:]
    rows = _complete(spec, 3, random_params(parse_space(SPACE), 3, seed=2))
    failed = [r for r in rows if r["state"] == "FAIL"]
    assert [r["number"] for r in failed] == [killed]
    retry = [r for r in rows if r["retry_of"] == killed]
    assert len(retry) == 1 and retry[0]["state"] in ("COMPLETE", "PRUNED")
    assert all(retry[0][k] == failed[0][k] for k in SPACE)  # the same parameters again


def test_tpe_fills_its_queued_tickets_within_the_space(tmp_path):
    spec = create_study(SYN, space=SPACE, trials=5, strategy="tpe", out=tmp_path / "tpe", seed=4)

    def objective(trial, values, epochs):
        return -abs(math.log10(values["optim.lr"]) + 1)

    assert Worker(spec, objective=objective).run(poll=0.05) == 5
    rows = trial_rows(spec)
    assert [r["state"] for r in rows] == ["COMPLETE"] * 5 and {r["stage"] for r in rows} == {"tpe"}
    assert all(0.02 <= r["optim.lr"] <= 0.5 and 1e-5 <= r["optim.weight_decay"] <= 1e-3 for r in rows)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_claiming_at_the_same_moment_get_different_trials(tmp_path, monkeypatch, request, backend):
    # Both claims read the queued trial before either writes: a barrier holds each claim between its read and its
    # write until the other has read too (or 3 s have passed, when the storage makes the second claim wait).
    import threading

    from optuna.storages._rdb import models
    from optuna.trial import TrialState

    url = f"sqlite:///{tmp_path / 'race.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    spec = create_study(SYN, space=SPACE, trials=4, epochs=1, out=tmp_path / "race", overrides=FAST, storage=url,
                        study=f"race-{os.getpid()}-{time.monotonic_ns()}")
    barrier = threading.Barrier(2)
    real = models.TrialModel.find_or_raise_by_id.__func__

    def find(cls, trial_id, session, for_update=False):
        trial = real(cls, trial_id, session, for_update)
        if for_update and trial.state == TrialState.WAITING:
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=3)
        return trial

    monkeypatch.setattr(models.TrialModel, "find_or_raise_by_id", classmethod(find))
    claimed: list[int] = []

    def claim():
        claimed.append(open_stage(spec, spec.name).ask().number)

    threads = [threading.Thread(target=claim) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(claimed) == 2 and len(set(claimed)) == 2, claimed


def test_a_lead_within_the_validation_noise_is_flagged():
    from visrec.tune import noise_warning

    best, second = {"number": 4, "value": 0.93}, {"number": 2, "value": 0.91}
    assert noise_warning(best, second, 10_000) is None  # 2 points on 10,000 images: well outside the noise
    w = noise_warning(best, second, 100)  # on 100 images a 2-point lead is a coin flip
    assert w is not None and "#4" in w and "#2" in w and "100 validation images" in w
    assert noise_warning(best, None, 100) is None


def test_a_study_is_judged_by_its_tasks_primary_metric_in_its_direction(tmp_path):
    """A task whose primary metric falls when it improves (bits per dimension) is minimized, and the study's files
    name the metric they hold."""
    from visrec.tune import StudySpec

    spec = create_study(SYN, space=SPACE, trials=2, epochs=1, out=tmp_path / "a", overrides=FAST)
    assert spec.objective() == ("acc", True)
    Worker(spec).run(poll=0.05)
    result = write_results(spec)
    assert result["metric"] == "val_acc" and (tmp_path / "a" / "trials.csv").read_text().split(",")[3] == "val_acc"
    gen = StudySpec(**{**spec.to_json(), "base": {**spec.base, "task": {"name": "generate"}}})
    assert gen.objective() == ("bpd", False)
    import optuna

    gen.name, gen.stages = "gen", ["gen"]
    assert open_stage(gen, "gen").direction == optuna.study.StudyDirection.MINIMIZE
