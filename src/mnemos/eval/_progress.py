"""Progress bars for long evaluations: tqdm when it is installed, else a plain stderr bar; no hard dependency."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from mnemos.eval.tables import si

__all__ = ["ProgressBar", "progress_bar"]


class ProgressBar:
    """The three calls the harness makes: ``update(n)``, ``set_description(text)``, ``close()``. Does nothing."""

    def update(self, n: int) -> None:
        pass

    def set_description(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class _TqdmBar(ProgressBar):
    def __init__(self, total: int, desc: str, file: TextIO):
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True, file=file, leave=False,
                         dynamic_ncols=True)

    def update(self, n: int) -> None:
        self._bar.update(n)

    def set_description(self, text: str) -> None:
        self._bar.set_description(text, refresh=False)

    def close(self) -> None:
        self._bar.close()


class _TextBar(ProgressBar):
    """``\\r<desc> [#####.....]  48%  1.2M/2.5M tok  350k tok/s``, redrawn at most ten times a second."""

    width = 24

    def __init__(self, total: int, desc: str, file: TextIO):
        self.total, self.desc, self.file = max(total, 1), desc, file
        self.done = 0
        self.start = self._last = time.perf_counter()
        self._drawn = False

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self._last >= 0.1 or self.done >= self.total:
            self._last = now
            self._draw(now)

    def set_description(self, text: str) -> None:
        self.desc = text

    def _draw(self, now: float) -> None:
        frac = min(self.done / self.total, 1.0)
        filled = round(frac * self.width)
        rate = self.done / max(now - self.start, 1e-9)
        line = (f"\r{self.desc} [{'#' * filled}{'.' * (self.width - filled)}] {frac:4.0%} "
                f"{si(self.done)}/{si(self.total)} tok {si(rate)} tok/s")
        self.file.write(line.ljust(100))
        self.file.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.file.write("\r" + " " * 100 + "\r")
            self.file.flush()


def progress_bar(total: int, desc: str, enabled: bool | None = None, *, file: TextIO | None = None) -> ProgressBar:
    """A bar counting ``total`` tokens. ``enabled=None`` shows it only when ``file`` (default stderr) is a terminal."""
    file = sys.stderr if file is None else file
    if enabled is None:
        enabled = file.isatty()
    if not enabled:
        return ProgressBar()
    try:
        return _TqdmBar(total, desc, file)
    except ImportError:
        return _TextBar(total, desc, file)
