"""`fedpit judge`: the LLM judge over a run directory's saved answers.

Two uses, as in the paper: each answer against its set's reference answer, and one run head to
head against another on the same examples. Nothing here loads a model: the judge reads what
`eval/` kept. Verdicts land in the judged run's `judge/` folder: `cache.jsonl` (every reply, the
reason reruns send nothing), `<stage>/<set>--vs-<other>.jsonl` (one verdict per example with both
raw replies) and `summary.json`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpit.config import JudgeConfig
from fedpit.errors import FedpitError
from fedpit.evaluation.judge import (
    JudgeBackend,
    Pair,
    VerdictCache,
    build_backend,
    judge_pairs,
    template_texts,
    win_tie,
)
from fedpit.evaluation.stats import Difference, paired_difference
from fedpit.runs import RunDir, atomic_write_text, finite_json

REFERENCE = "reference"
SCORE = {"win": 1.0, "tie": 0.0, "lose": -1.0}


@dataclass
class SetVerdicts:
    """One set's verdicts for one candidate against one other (the reference, or another run)."""

    set: str
    against: str
    verdicts: dict[str, str]
    """Example id -> win / tie / lose / invalid."""
    requests: int
    failures: list[str]

    def counts(self) -> dict[str, int]:
        values = list(self.verdicts.values())
        return {v: values.count(v) for v in ("win", "tie", "lose", "invalid")}

    def win_tie(self) -> Difference:
        """Win+Tie share of the valid verdicts, with its 95% bootstrap interval over examples."""
        return paired_difference(np.array([float(v != "lose") for v in self.verdicts.values() if v != "invalid"]))

    def net(self) -> Difference:
        """Win rate minus lose rate: its interval excluding 0 says one model is preferred."""
        return paired_difference(np.array([SCORE[v] for v in self.verdicts.values() if v != "invalid"]))


def latest_stage(run: RunDir) -> str:
    """`final` when the run evaluated whole sets, else its last per-round evaluation."""
    stages = sorted(p.name for p in (run.path / "eval").glob("*") if p.is_dir()) if (run.path / "eval").is_dir() else []
    if "final" in stages:
        return "final"
    rounds = [s for s in stages if s.startswith("round-")]
    if not rounds:
        raise FedpitError(f"'{run.path}' kept no evaluation answers (no eval/ folder); it was made before answers "
                          f"were kept, or with evaluation off: rerun it")
    return rounds[-1]


def stage_of(run: RunDir, round_num: int | None) -> str:
    if round_num is None:
        return latest_stage(run)
    stage = f"round-{round_num:03d}"
    if not (run.path / "eval" / stage).is_dir():
        raise FedpitError(f"'{run.path}' has no answers of round {round_num} (eval/{stage}); choose a round it "
                          f"evaluated, or omit --round for the final evaluation")
    return stage


def _prompt_text(record: dict) -> str:
    return f"{record['instruction']}\n\n{record['input']}" if record.get("input") else record["instruction"]


def judge_run(
    run_path: Path,
    config: JudgeConfig,
    round_num: int | None = None,
    sets: list[str] | None = None,
    against: Path | None = None,
    backend: JudgeBackend | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> list[SetVerdicts]:
    """Judge a run's answers against the references, or (`against`) against another run's answers to
    the same examples (matched by example id)."""
    run = RunDir(run_path)
    stage = stage_of(run, round_num)
    answers = run.load_answers(stage)
    others = None
    other_name = REFERENCE
    if against is not None:
        other_run = RunDir(against)
        others = other_run.load_answers(stage)
        other_name = Path(against).name
        if not others:
            raise FedpitError(f"'{against}' kept no answers for eval/{stage}; judge runs evaluated the same way")
    chosen = sets or sorted(answers)
    unknown = [s for s in chosen if s not in answers]
    if unknown:
        raise FedpitError(f"'{run_path}' has no answers for set(s) {', '.join(unknown)} in eval/{stage}; it has: "
                          f"{', '.join(sorted(answers)) or 'none'}")
    backend = backend or build_backend(config)
    template = template_texts(config.template)
    cache = VerdictCache(run.path / "judge" / "cache.jsonl")
    results = []
    for name in chosen:
        records = answers[name]
        if others is None:
            pairs = [Pair(r["id"], _prompt_text(r), r["answer"], r["reference"]) for r in records]
        else:
            theirs = {r["id"]: r for r in others.get(name, [])}
            pairs = [Pair(r["id"], _prompt_text(r), r["answer"], theirs[r["id"]]["answer"])
                     for r in records if r["id"] in theirs]
            if not pairs:
                raise FedpitError(f"'{run_path}' and '{against}' share no examples in set {name}; compare runs "
                                  f"evaluated on the same held-out sets (same eval.seed)")
        callback = (lambda d, t, n=name: on_progress(f"judge {n}", d, t)) if on_progress else None
        outcome = judge_pairs(backend, template, pairs, cache, config.max_concurrency, callback)
        verdicts = SetVerdicts(set=name, against=other_name, requests=outcome.requests, failures=outcome.failures,
                               verdicts={j.id: j.verdict for j in outcome.judgements})
        _save(run, stage, verdicts, [j.as_record() for j in outcome.judgements], config)
        results.append(verdicts)
    return results


def _save(run: RunDir, stage: str, verdicts: SetVerdicts, records: list[dict], config: JudgeConfig) -> None:
    folder = run.path / "judge" / stage
    atomic_write_text(folder / f"{verdicts.set}--vs-{verdicts.against}.jsonl",
                      "".join(json.dumps(r) + "\n" for r in records))
    summary_file = run.path / "judge" / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    counts = verdicts.counts()
    summary[f"{stage}/{verdicts.set}/vs-{verdicts.against}"] = {
        "judge_model": config.model, "template": config.template, **counts, "win_tie": win_tie(counts)}
    atomic_write_text(summary_file, json.dumps(finite_json(summary), indent=2, allow_nan=False))


def load_verdicts(run_path: Path, stage: str, set_name: str, against: str = REFERENCE) -> dict[str, str]:
    """Saved verdicts of one set ({} when it was not judged)."""
    file = Path(run_path) / "judge" / stage / f"{set_name}--vs-{against}.jsonl"
    if not file.is_file():
        return {}
    return {r["id"]: r["verdict"] for r in (json.loads(line) for line in file.read_text().splitlines() if line)}


def judge_groups(groups: dict[str, list[Path]], reference: str | None, config: JudgeConfig,
                 on_progress: Callable[[str, int, int], None] | None = None) -> list[str]:
    """What `fedpit compare` asks the judge when `[eval.judge]` is set: every run against the reference
    answers, and every row's run head to head against the reference row's run of the same seed.
    One backend serves all; cached verdicts make a resumed comparison free. Returns the failures."""
    backend = build_backend(config)
    failures: list[str] = []
    for label, paths in groups.items():
        for index, path in enumerate(paths):
            rival = groups[reference][index] if reference and label != reference else None
            for against in ([None, rival] if rival is not None else [None]):
                for result in judge_run(path, config, against=against, backend=backend, on_progress=on_progress):
                    failures += result.failures
    return failures
