"""The stage runner behind ``make demo``: each stage runs once, records what it made, and is reused next time.

A stage is a name, a fingerprint of everything that decides its output (its settings and the fingerprints of the
stages it reads), and a function that writes into its own folder under the work directory. ``stages.json`` in the
work directory records, per finished stage, the fingerprint, the wall-clock seconds and a small result dict. A
second run reuses a stage whose fingerprint is unchanged and whose folder still exists; a stage whose settings
changed runs again, and so does everything downstream of it (their fingerprints include its fingerprint). A
stage that was interrupted is not recorded, so it runs again; the training stages resume from their own
checkpoints inside their folders.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Any, Callable, Mapping, Sequence

from dynamicid_jax.file_io import write_json

__all__ = ["Stage", "StageRunner", "fingerprint"]


def fingerprint(settings: Any, *upstream: str) -> str:
    """A short stable hash of JSON-able ``settings`` and upstream fingerprints."""
    blob = json.dumps({"settings": settings, "upstream": list(upstream)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Stage:
    """``run(folder) -> result dict`` writes everything into ``folder`` (created for it)."""

    name: str
    title: str
    settings: Mapping[str, Any]
    run: Callable[[str], dict]
    needs: Sequence[str] = ()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class StageRunner:
    """Runs stages in order inside ``work_dir``; see the module docstring."""

    def __init__(self, work_dir: str, *, log: Callable[[str], None] = _log):
        self.work_dir = os.path.abspath(work_dir)
        os.makedirs(self.work_dir, exist_ok=True)
        self.record_path = os.path.join(self.work_dir, "stages.json")
        self.log = log
        self.records: dict[str, dict] = {}
        if os.path.exists(self.record_path):
            with open(self.record_path, encoding="utf-8") as f:
                self.records = json.load(f)
        self.fingerprints: dict[str, str] = {}
        self.summary: dict[str, dict] = {}

    def folder(self, name: str) -> str:
        return os.path.join(self.work_dir, name)

    def _save_records(self) -> None:
        write_json(self.records, self.record_path)

    def run(self, stages: Sequence[Stage]) -> dict[str, dict]:
        """Run (or reuse) every stage; returns ``{name: {"seconds", "reused", "result"}}``."""
        for number, stage in enumerate(stages, 1):
            missing = [n for n in stage.needs if n not in self.fingerprints]
            if missing:
                raise ValueError(f"stage {stage.name!r} needs {missing}, which did not run before it")
            fp = fingerprint(dict(stage.settings), *(self.fingerprints[n] for n in stage.needs))
            self.fingerprints[stage.name] = fp
            folder = self.folder(stage.name)
            record = self.records.get(stage.name)
            head = f"[{number}/{len(stages)}] {stage.title}"
            if record and record.get("fingerprint") == fp and os.path.isdir(folder):
                self.log(f"{head}: reused (finished earlier in {record['seconds']:.1f} s)")
                self.summary[stage.name] = {"seconds": 0.0, "reused": True, "result": record.get("result", {})}
                continue
            if record and record.get("fingerprint") != fp:
                self.log(f"{head}: settings (or an earlier stage) changed since the last run, running again")
                shutil.rmtree(folder, ignore_errors=True)  # an interrupted run (no record) keeps its checkpoints
            self.records.pop(stage.name, None)
            self._save_records()
            os.makedirs(folder, exist_ok=True)
            self.log(f"{head} …")
            start = time.perf_counter()
            result = stage.run(folder) or {}
            seconds = time.perf_counter() - start
            self.log(f"{head}: done in {seconds:.1f} s")
            self.records[stage.name] = {"fingerprint": fp, "seconds": seconds, "result": result,
                                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
            self._save_records()
            self.summary[stage.name] = {"seconds": seconds, "reused": False, "result": result}
        return self.summary
