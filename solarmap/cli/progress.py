"""One progress display for long runs, built on tqdm: tiles done of all, tiles per second, ETA and
panels found, as a live bar on a terminal; nothing when stderr is not a terminal (a log file or a
pipe gets the summary only) or with ``--quiet``."""

from __future__ import annotations

import sys

__all__ = ["Progress", "stderr_is_terminal"]

BAR_FORMAT = "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} tiles [{elapsed}<{remaining}, {rate_fmt}]{postfix}"


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


class Progress:
    """Call :meth:`show` with the tiles done and in all (and what else to show, e.g. ``panels=12``);
    :meth:`close` at the end. Tiles done before the first call (a resumed run) do not count towards
    the rate, so the ETA is the remaining tiles at the rate of this run."""

    def __init__(self, quiet: bool):
        self.enabled = not quiet and stderr_is_terminal()
        self.bar = None

    def show(self, done: int, total: int, **postfix) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="tiles", file=sys.stderr, dynamic_ncols=True,
                            mininterval=0.5, smoothing=0.1, bar_format=BAR_FORMAT)
        self.bar.total = total
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
