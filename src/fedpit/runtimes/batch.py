"""Several runs in one process (a method comparison, a parameter sweep): one base model loaded
once, one run directory per job; complete runs are skipped and an interrupted one continues from
its last checkpoint, so an interrupted batch resumes where it stopped."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from fedpit.config import Config
from fedpit.model import ModelHandle
from fedpit.progress import RunProgress
from fedpit.report import write_report
from fedpit.runs import RunDir, private_dir
from fedpit.runtimes.local import build_clients, open_run, prepare, run_experiment


@dataclass(frozen=True)
class Job:
    label: str
    config: Config


def check_privacy(jobs: list[Job]) -> None:
    """DP settings hold or fail by every client's size (delta below 1/n, a reachable target epsilon):
    check each DP job's on its own clients before the first job trains, not hours into a batch."""
    from transformers import AutoTokenizer

    from fedpit.methods import build_method
    from fedpit.model import resolve_model_path

    tokenizers: dict[str, object] = {}
    for job in jobs:
        cfg = job.config
        if not (cfg.privacy.dp.enabled or cfg.privacy.client_dp.enabled):
            continue
        if cfg.model.name not in tokenizers:
            tokenizers[cfg.model.name] = AutoTokenizer.from_pretrained(
                resolve_model_path(cfg.model.name, cfg.model.cache_dir),
                trust_remote_code=cfg.model.trust_remote_code)
        build_clients(cfg, build_method(cfg), tokenizers[cfg.model.name])


def run_jobs(jobs: list[Job], root: Path, progress: RunProgress) -> list[Path]:
    check_privacy(jobs)
    private_dir(root)
    handle: ModelHandle | None = None
    paths = []
    for index, job in enumerate(jobs, start=1):
        path = root / job.label
        paths.append(path)
        if RunDir(path).read_status().get("status") == "complete":
            progress.message(f"[{index}/{len(jobs)}] {job.label}: complete, skipped")
            continue
        exp = prepare(job.config, handle=handle)
        handle = exp.handle
        resume = (path / "config.toml").is_file() and RunDir(path).read_status().get("identity") == exp.identity()
        if path.exists() and not resume:
            shutil.rmtree(path)  # made by other code or data, or never started: begin again
        progress.message(f"[{index}/{len(jobs)}] {job.label}: {'resuming' if resume else 'running'}")
        run = open_run(exp, path, resume=resume)
        start = time.perf_counter()
        try:
            run_experiment(exp, run, progress)
        except BaseException as exc:
            run.write_status("failed", error=f"{type(exc).__name__}: {exc}")
            raise
        run.write_status("complete", seconds=round(time.perf_counter() - start, 1))
        write_report(path)
    return paths
