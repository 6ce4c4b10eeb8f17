"""Progress bars: tqdm, except that a command whose stderr is a log file rather than a terminal
redraws them at most every LOG_INTERVAL seconds (a fit then writes ~20 lines, not thousands)."""

from __future__ import annotations

from tqdm.auto import tqdm as _tqdm

LOG_INTERVAL = 30.0
to_log = False  # set by the CLI when stderr is not a terminal; library use is left alone


def tqdm(*args, **kwargs):
    """tqdm.auto.tqdm, with mininterval=LOG_INTERVAL when writing to a log (unless given)."""
    if to_log:
        kwargs.setdefault("mininterval", LOG_INTERVAL)
    return _tqdm(*args, **kwargs)
