"""Progress of long loops in experiment scripts: a tqdm bar on a terminal, plain lines on stderr otherwise.

With stdout and stderr both terminals, :class:`Progress` draws a ``tqdm`` bar (on stderr, as
``transformers.Trainer`` and ``accelerate`` do). Otherwise (output redirected to a file or a pipe) it
writes one line to stderr whenever 10% of the steps or 30 s have passed since the last line, and one at
the end::

    sgd seed 0: step 1500/5000 (30%), loss 0.2134, elapsed 12.0 s, ETA 28.0 s

The loss is whatever the loop last passed to :meth:`Progress.report`; it is read (``float``, a device
sync for a GPU tensor) only when a line is written or the bar is refreshed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

__all__ = ["interactive", "Progress", "progress"]


def interactive() -> bool:
    """True when stdout and stderr are both terminals (then progress is a tqdm bar, else lines)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def _seconds(t: float) -> str:
    if t < 60:
        return f"{t:.1f} s"
    minutes, seconds = divmod(round(t), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


class Progress:
    """Progress of a loop of ``total`` steps (see the module docstring for what is shown where).

    ``for item in Progress(iterable, total, desc): ...; bar.report(loss=loss)`` counts one step per item;
    a loop without an iterable calls :meth:`update`. ``initial`` steps were done before (a resumed run:
    counted in ``step``, not in the rate behind the ETA). ``every`` (fraction of ``total``) and ``seconds``
    set the cadence of the plain lines; ``stream`` (default ``sys.stderr``) receives them, and
    ``bar=True/False`` forces the tqdm bar on or off (default: :func:`interactive`). A bar with
    ``leave=False`` is cleared when the loop ends; the plain lines always stay.
    """

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        total: int | None = None,
        desc: str = "",
        *,
        initial: int = 0,
        leave: bool = True,
        every: float = 0.1,
        seconds: float = 30.0,
        stream: TextIO | None = None,
        bar: bool | None = None,
    ) -> None:
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        if total is not None and total < 0:
            raise ValueError(f"Progress: total must be >= 0, got {total}")
        if not 0 < every <= 1 or seconds <= 0:
            raise ValueError(f"Progress: need 0 < every <= 1 and seconds > 0, got every={every}, seconds={seconds}")
        self.iterable, self.total, self.desc = iterable, total, desc
        self.every, self.seconds = every, seconds
        self.stream = stream
        self.count = self._initial = self._last_count = initial
        self.loss: Any = None
        self._start = self._last_time = time.perf_counter()
        self._closed = False
        self._tqdm: Any = None
        if interactive() if bar is None else bar:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # tqdm is in the "examples" extra; without it, plain lines
                pass
            else:
                self._tqdm = tqdm(total=total, initial=initial, desc=desc, leave=leave, file=stream)

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("Progress: no iterable to loop over; call update() instead")
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def report(self, loss: Any = None) -> None:
        """Keep ``loss`` (a float or a 0-d tensor) for the next line; not read until then."""
        self.loss = loss

    def update(self, n: int = 1) -> None:
        """Count ``n`` more steps; write a line (or refresh the bar) when it is due."""
        self.count += n
        now = time.perf_counter()
        if self._tqdm is not None:
            self._tqdm.update(n)
            if self.loss is not None and now - self._last_time >= 1.0:
                self._tqdm.set_postfix(loss=f"{float(self.loss):.4g}", refresh=False)
                self._last_time = now
            return
        due_count = self.total is not None and self.count - self._last_count >= max(1.0, self.every * self.total)
        if due_count or now - self._last_time >= self.seconds:
            self._line(now)

    def close(self) -> None:
        """End the bar, or write the last line if steps were counted since the previous one."""
        if self._closed:
            return
        self._closed = True
        if self._tqdm is not None:
            self._tqdm.close()
        elif self.count != self._last_count:
            self._line(time.perf_counter())

    def line(self, now: float | None = None) -> str:
        """The text of a progress line at time ``now`` (``time.perf_counter()``; default: now)."""
        elapsed = (time.perf_counter() if now is None else now) - self._start
        head = f"{self.desc}: " if self.desc else ""
        parts = [f"step {self.count}" + (f"/{self.total} ({100 * self.count / max(self.total, 1):.0f}%)"
                                          if self.total is not None else "")]
        if self.loss is not None:
            parts.append(f"loss {float(self.loss):.4g}")
        parts.append(f"elapsed {_seconds(elapsed)}")
        done = self.count - self._initial
        if self.total is not None and done > 0 and self.count < self.total:
            parts.append(f"ETA {_seconds(elapsed / done * (self.total - self.count))}")
        return head + ", ".join(parts)

    def _line(self, now: float) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        print(self.line(now), file=stream, flush=True)
        self._last_time, self._last_count = now, self.count


def progress(iterable: Iterable[Any], total: int | None = None, desc: str = "", leave: bool = True) -> Progress:
    """``Progress(iterable, total, desc, leave=leave)``: loop over ``iterable`` showing progress."""
    return Progress(iterable, total, desc, leave=leave)
