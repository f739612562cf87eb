"""The run folder's writer: the files that describe a run (config, splits, architecture), its records as
metrics.jsonl, and summary.json, built from the records it holds in memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import Config
from ..data import Dataset
from ..io import write_json, write_text, write_yaml
from .callbacks import Callback, TrainState


class RunWriter(Callback):
    """The first observer of every run: it appends each record to metrics.jsonl (flushed as written) and keeps
    them, so the summary needs no second read of the file. A resumed run drops the records logged after the
    checkpoint it resumes from: they would be repeated."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, write: bool = True):
        """`write=False` (ranks other than 0 across processes) keeps the records in memory and writes nothing."""
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        self.write = write
        if resume_step is not None and self.path.exists():
            self.records = [r for r in map(json.loads, filter(str.strip, self.path.read_text().splitlines()))
                            if r.get("step", 0) <= resume_step]
            if write:
                self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self._f = None

    def write_files(self, cfg: Config, ds: Dataset, model_text: str) -> None:
        """config.yaml, splits.json, model.txt and the list of images left out, before the first step."""
        if not self.write:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_yaml(self.run_dir / "config.yaml", cfg.anchored().to_dict())  # its paths mean the same from anywhere
        ids = {"category_ids": ds.test.category_ids} if ds.test.category_ids else {}  # results files name them
        write_json(self.run_dir / "splits.json", {"dataset": ds.name, "source": ds.source, "classes": ds.classes,
                                                  **ids, **ds.splits})
        write_text(self.run_dir / "model.txt", model_text)
        skipped = ds.splits.get("skipped_images")
        if skipped:
            write_text(self.run_dir / "skipped_images.txt",
                       "".join(f"{f['path']}\t{f['problem']}\n" for f in skipped["files"]))

    def _write(self, rec: dict[str, Any]) -> None:
        if not self.write:
            self.records.append(rec)
            return
        if self._f is None:
            self._f = open(self.path, "a")  # noqa: SIM115 - closed in on_train_end
        self.records.append(rec)
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()

    def on_window(self, state, record):
        self._write(record)

    def on_epoch_end(self, state, records):
        for r in records:
            self._write(r)

    def on_train_end(self, state: TrainState, summary):
        final = summary.get("test")
        if final:
            metrics = {k: v for k, v in final.items() if isinstance(v, int | float) and k != "n"}
            self._write({"epoch": state.epoch, "step": state.step, "split": "test", "kind": "final",
                         **metrics, "lr": None, "seconds": state.train_seconds})
        if self._f is not None:
            self._f.close()
            self._f = None

    def last(self, split: str, kind: str = "epoch") -> dict[str, Any] | None:
        found = [r for r in self.records if r["split"] == split and r["kind"] == kind]
        return found[-1] if found else None

    def write_summary(self, summary: dict[str, Any], primary: str) -> dict[str, Any]:
        """summary.json: `summary` with the last validation and training-epoch values of the primary metric."""
        val, train = self.last("val"), self.last("train")
        out = dict(summary)
        out[f"val_{primary}"] = val.get(primary) if val else None
        out[f"train_{primary}"] = train.get(primary) if train else None  # a task may not track it per batch
        if self.write:
            write_json(self.run_dir / "summary.json", out)
        return out
