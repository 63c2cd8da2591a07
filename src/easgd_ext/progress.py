"""Progress on stderr: tqdm's bar on a terminal; in a log file or a pipe, a plain line at every
tenth of the work (a bar redrawn with carriage returns floods a log)."""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator


class LineProgress:
    """The subset of tqdm the tools use (``update``, ``set_postfix``, ``close``, iteration),
    written as a line per tenth of ``total``."""

    def __init__(self, iterable: Iterable[Any] | None = None, total: int | None = None,
                 desc: str = "", unit: str = "it", file: Any = None, **_: Any) -> None:
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)  # type: ignore[arg-type]
        self.desc, self.unit, self.file = desc.strip(), unit, file or sys.stderr
        self.n, self.postfix, self.start = 0, "", time.perf_counter()
        self._next = self._step()

    def _step(self) -> int:
        return self.n + max(1, (self.total or 10) // 10)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self._next or (self.total is not None and self.n >= self.total):
            self._next = self._step()
            done = f"{self.n}/{self.total}" if self.total else str(self.n)
            print(f"{self.desc}: {done} {self.unit}s, {time.perf_counter() - self.start:.1f} s"
                  + (f", {self.postfix}" if self.postfix else ""), file=self.file, flush=True)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        pass

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)


def bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
    """A progress bar for ``iterable`` (or ``total=``): tqdm where stderr is a terminal, else
    :class:`LineProgress`."""
    file = kwargs.setdefault("file", sys.stderr)
    if hasattr(file, "isatty") and file.isatty():
        from tqdm import tqdm

        return tqdm(iterable, **kwargs)
    return LineProgress(iterable, **kwargs)
