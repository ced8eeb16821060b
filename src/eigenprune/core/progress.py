"""Progress bars that say which step they belong to, one line per level, silent when nobody watches.

A long function takes `progress: bool | str`: False draws nothing; True draws a bar named by what the
function does ("generate", "scoring"); a string draws it and names where in the experiment it is
("fold 2/5 · eigenprune · dev p=0.05: generate"). The caller that knows the step (the `Harness`, which
carries the labels down) passes the string; the function adds only its own part. Bars go to stderr,
are removed when done (the level above keeps its line) and are off when stderr is not a terminal.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

SEP = " · "


def label(progress: bool | str, what: str) -> str:
    """The bar's description: the caller's step (when it gave one), then what the bar counts."""
    return f"{progress}: {what}" if isinstance(progress, str) and progress else what


def bar(iterable=None, *, progress: bool | str, what: str, leave: bool = False, **kwargs) -> tqdm:
    """A tqdm bar named `label(progress, what)`; none when `progress` is False or stderr is not a terminal."""
    return tqdm(iterable, desc=label(progress, what), disable=None if progress is not False else True,
                leave=leave, file=sys.stderr, dynamic_ncols=True, **kwargs)


def say(text: str, quiet: bool = False) -> None:
    """One progress line on stderr (above any bars), unless quiet or stderr is not a terminal."""
    if not quiet and sys.stderr.isatty():
        tqdm.write(text, file=sys.stderr)
