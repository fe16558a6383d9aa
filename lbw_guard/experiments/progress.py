"""Rich progress bars for the sweep: one bar over all runs, one over the current run's steps."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


class SweepProgress:
    """Progress display; with ``enabled=False`` it prints nothing (tests, piped output)."""

    def __init__(self, console: Console | None = None, enabled: bool = True) -> None:
        # log_path=False: no "progress.py:NN" at the end of every logged line
        self.console = console or Console(stderr=True, log_path=False)
        self.enabled = enabled
        self._progress: Progress | None = None
        self._sweep_task = None

    def __enter__(self) -> "SweepProgress":
        if self.enabled:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def note(self, message: str) -> None:
        if self.enabled:
            self.console.log(message)

    def start_sweep(self, total_runs: int, completed: int = 0, title: str = "stress sweep (runs)") -> None:
        """The bar over all runs; ``completed`` of them were done before (``--resume``)."""
        if self._progress is not None:
            self._sweep_task = self._progress.add_task(f"[bold]{title}", total=total_runs, completed=completed)

    def add_total(self, runs: int) -> None:
        """More runs than planned (the matrix's lr sweep grew past an edge of its grid)."""
        if self._progress is not None and self._sweep_task is not None and runs:
            task = self._progress.tasks[[t.id for t in self._progress.tasks].index(self._sweep_task)]
            self._progress.update(self._sweep_task, total=(task.total or 0) + runs)

    def advance(self, message: str | None = None) -> None:
        """One more run finished (without a RunResult to describe): advance the bar, log a line."""
        if self._progress is None:
            return
        if self._sweep_task is not None:
            self._progress.advance(self._sweep_task)
        if message:
            self.console.log(message, markup=False, highlight=False)

    @contextlib.contextmanager
    def run(self, label: str, steps: int) -> Iterator[Callable[[int], None]]:
        """A per-run bar; yields ``tick(steps_done)``."""
        if self._progress is None:
            yield lambda _done: None
            return
        task = self._progress.add_task(label, total=steps)
        try:
            yield lambda done: self._progress.update(task, completed=done)
        finally:
            self._progress.remove_task(task)

    def finish_run(self, result) -> None:
        if self._progress is None:
            return
        if self._sweep_task is not None:
            self._progress.advance(self._sweep_task)
        ppl = "diverged" if result.diverged and result.final_ppl == float("inf") else f"{result.final_ppl:.1f}"
        extra = ""
        if result.guard is not None:
            g = result.guard
            extra = f" skips {g.skipped_steps} rollbacks {g.rollbacks} min scale {g.min_lr_scale:.2f}"
        self.console.log(
            f"{result.size} seed {result.seed} lr {result.lr:g} {result.arm}: ppl {ppl}, "
            f"{result.train_seconds:.1f}s, {result.tokens_per_second:,.0f} tok/s{extra}"
        )
