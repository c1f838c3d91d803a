"""Progress bars (tqdm) for long jobs: on stderr, only on a terminal, never with --quiet."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

__all__ = ["progress_bar"]


def progress_bar(total: int, desc: str, *, unit: str = "frame", quiet: bool = False) -> Any:
    """A tqdm bar of `total` steps; disabled when `quiet` or stderr is not a TTY.

    The bar appears only after 0.5 s, so short files print nothing.
    """
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=quiet or not sys.stderr.isatty(),
        delay=0.5,
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
    )
