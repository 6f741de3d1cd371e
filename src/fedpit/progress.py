"""Visible progress: rounds, clients and the current phase, with ETA (rich), or plain log lines.

Methods and engines only call `phase(label, done, total)`; they never know how it is shown.
"""

from __future__ import annotations

import logging
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger("fedpit")


class RunProgress:
    def __init__(self, quiet: bool = False, console: Console | None = None) -> None:
        self.quiet = quiet
        self.console = console or Console(stderr=True)
        self._bar: Progress | None = None
        self._tasks: dict[str, int] = {}
        self._phase_label = ""

    def __enter__(self) -> RunProgress:
        if not self.quiet:
            self._bar = Progress(
                TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=self.console, transient=False,
            )
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None

    def _task(self, key: str, description: str, total: int) -> None:
        if self._bar is None:
            return
        if key not in self._tasks:
            self._tasks[key] = self._bar.add_task(description, total=total)
        else:
            self._bar.reset(self._tasks[key], total=total, description=description)

    def rounds(self, total: int) -> None:
        self._task("rounds", "rounds", total)

    def round_done(self, round_num: int, summary: str) -> None:
        if self._bar is not None:
            self._bar.update(self._tasks["rounds"], completed=round_num)
        self.message(f"round {round_num}: {summary}")

    def clients(self, round_num: int, total: int) -> None:
        self._task("clients", f"round {round_num} clients", total)

    def client_done(self, done: int) -> None:
        if self._bar is not None:
            self._bar.update(self._tasks["clients"], completed=done)

    def phase(self, label: str, done: int, total: int) -> None:
        if self._bar is None:
            return
        if label != self._phase_label or "phase" not in self._tasks:
            self._phase_label = label
            self._task("phase", f"  {label}", total)
        self._bar.update(self._tasks["phase"], completed=done, total=total)

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {text}", highlight=False)
        else:
            log.info(text)
