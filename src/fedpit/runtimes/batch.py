"""Several runs in one process (a method comparison, a parameter sweep): one base model loaded
once, one run directory per job, complete runs skipped so an interrupted batch resumes."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from fedpit.config import Config
from fedpit.model import ModelHandle
from fedpit.progress import RunProgress
from fedpit.report import write_report
from fedpit.runs import RunDir
from fedpit.runtimes.local import prepare, run_experiment


@dataclass(frozen=True)
class Job:
    label: str
    config: Config


def run_jobs(jobs: list[Job], root: Path, progress: RunProgress) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    handle: ModelHandle | None = None
    paths = []
    for index, job in enumerate(jobs, start=1):
        path = root / job.label
        paths.append(path)
        if RunDir(path).read_status().get("status") == "complete":
            progress.message(f"[{index}/{len(jobs)}] {job.label}: complete, skipped")
            continue
        if path.exists():
            shutil.rmtree(path)  # an interrupted run restarts from scratch (no mid-run resume yet)
        progress.message(f"[{index}/{len(jobs)}] {job.label}: running")
        exp = prepare(job.config, handle=handle)
        handle = exp.handle
        run = RunDir.create(path, job.config)
        run.write_status("running", federation=exp.federation.summary())
        start = time.perf_counter()
        try:
            run_experiment(exp, run, progress)
        except BaseException as exc:
            run.write_status("failed", error=f"{type(exc).__name__}: {exc}")
            raise
        run.write_status("complete", seconds=round(time.perf_counter() - start, 1))
        write_report(path)
    return paths
