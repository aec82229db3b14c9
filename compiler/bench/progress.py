"""Progress of a bench run: a rich progress bar on a terminal, silence elsewhere."""
from __future__ import annotations

from typing import Protocol


class BenchProgress(Protocol):
    def begin(self, total: int) -> None: ...

    def describe(self, text: str) -> None: ...

    def advance(self, steps: int = 1) -> None: ...

    def note(self, message: str) -> None: ...

    def end(self) -> None: ...


class NullProgress:
    def begin(self, total: int) -> None:
        pass

    def describe(self, text: str) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def end(self) -> None:
        pass


class RichProgress:
    """Bar on stderr: one step per repetition (warm-up included) of every engine and context."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=self.console, transient=True)
        self.task = None

    def begin(self, total: int) -> None:
        self.bar.start()
        self.task = self.bar.add_task("bench", total=total)

    def describe(self, text: str) -> None:
        if self.task is not None:
            self.bar.update(self.task, description=text)

    def advance(self, steps: int = 1) -> None:
        if self.task is not None:
            self.bar.advance(self.task, steps)

    def note(self, message: str) -> None:
        self.console.log(message)

    def end(self) -> None:
        self.bar.stop()


def progress_for(stream) -> BenchProgress:
    return RichProgress() if stream.isatty() else NullProgress()
