"""Hyperparameter search on Optuna: random in log space, grid, TPE, and coarse-to-fine; parallel workers.

The course's recipe: random search beats grid search; sample learning rate and regularization in log space;
start coarse with few epochs, then refine; stop trials that blow up; look at the results.

    visrec tune fashion-mnist --space space.yaml --trials 20 --workers 2 --epochs 3

A search space is YAML, one line per config key:

    optim.lr: {loguniform: [1.0e-4, 1.0]}
    optim.weight_decay: {loguniform: [1.0e-6, 1.0e-2]}
    loss.label_smoothing: {uniform: [0.0, 0.2]}
    train.batch_size: {categorical: [64, 128, 256]}
    model.kwargs.widths: {categorical: [[16, 32, 64], [32, 64, 128]]}
    train.epochs: {int: [2, 6]}

Every trial is a visrec run folder inside the study folder, judged by its final validation accuracy; the test
split is never touched during the search (`--final` retrains the best config and evaluates on test once).

Trials live in Optuna RDB storage: a SQLite file in the study folder by default, or any SQLAlchemy URL (e.g.
PostgreSQL) that workers on several machines share. The parameters of random, grid and coarse-to-fine trials are
drawn up front from the seed and queued; TPE trials are queued as tickets its sampler fills in. Workers take
queued trials until none is left, so N trials run exactly once each. A worker sends a heartbeat while it trains;
when one dies (even by SIGKILL) its trial is marked failed after the grace period and queued again with the same
parameters, and the other workers carry on.
"""

from __future__ import annotations

from .results import _axis, _progress_png, _scatter_png, best_trial, final, leaderboard, trial_rows, tune, write_results  # noqa: F401
from .space import (  # noqa: F401
    DEFAULT_SPACE,
    KINDS,
    PRUNERS,
    STRATEGIES,
    Param,
    _hashable,
    _parse_param,
    _product,
    _same,
    _unhashable,
    edge_warnings,
    grid_params,
    narrow,
    noise_warning,
    parse_space,
    random_params,
    task_class,
)
from .study import (  # noqa: F401
    _STORAGES,
    StudySpec,
    _advance,
    _enqueue,
    _open_storage,
    _pruner,
    _quiet_optuna,
    _sampler,
    _serialize_sqlite,
    _state_counts,
    _storage,
    create_study,
    load_spec,
    open_stage,
)
from .worker import TrialWatch, Worker, _all_done, _Unqueued, run_workers, trial_config, worker_main  # noqa: F401

__all__ = ["DEFAULT_SPACE", "KINDS", "PRUNERS", "Param", "STRATEGIES", "StudySpec", "TrialWatch", "Worker",
           "best_trial", "create_study", "edge_warnings", "final", "grid_params", "leaderboard", "load_spec",
           "narrow", "noise_warning", "open_stage", "parse_space", "random_params", "run_workers",
           "task_class", "trial_config", "trial_rows", "tune", "worker_main", "write_results"]
