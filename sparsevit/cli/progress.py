"""Progress lines with an ETA, one complete line per finished case, on stderr.

A line per case (never a redrawn bar) cannot run into a table printed afterwards,
and the ETA (elapsed time per case so far × cases left) says early whether a run
will take one minute or ten.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Iterator, Optional, TextIO, TypeVar

__all__ = ["Progress", "format_seconds", "progress"]

T = TypeVar("T")


def format_seconds(seconds: float) -> str:
    """``75`` -> ``"1:15"``; ``3725`` -> ``"1:02:05"``."""
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """``advance(label)`` after each of ``total`` cases prints ``desc [i/total] label | elapsed, ETA``."""

    def __init__(self, total: int, desc: str, stream: Optional[TextIO] = None) -> None:
        if total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        self.total, self.desc, self.done = total, desc, 0
        self.stream = stream
        self.start = time.perf_counter()

    def advance(self, label: str = "") -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        left = max(0, self.total - self.done)
        eta = elapsed / self.done * left
        stream = self.stream if self.stream is not None else sys.stderr
        tail = f"ETA {format_seconds(eta)}" if left else "done"
        print(f"{self.desc} [{self.done}/{self.total}] {label} | elapsed {format_seconds(elapsed)}, {tail}",
              file=stream, flush=True)


def progress(items: Iterable[T], desc: str, label: Optional[Callable[[T], str]] = None,
             stream: Optional[TextIO] = None) -> Iterator[T]:
    """Yield ``items``, printing a progress line (``label(item)``, default ``str``) after each one."""
    items = list(items)
    bar = Progress(len(items), desc, stream)
    for item in items:
        yield item
        bar.advance((label or str)(item))
