"""The `eigenprune` command's entry point (console script and `python -m eigenprune`): signals first.

Signal handling is installed before anything heavy is imported (torch, transformers: seconds), so a
Ctrl-C or SIGTERM at any moment, imports and model loading included, ends in the same one line and
exit code (`core/signals.py`) after the usual cleanup, never in a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from eigenprune.core import signals


def main(argv: Sequence[str] | None = None) -> int:
    signals.install()
    try:
        from eigenprune.cli import main as cli_main

        return cli_main(argv)
    except BaseException as err:  # noqa: B036 — a signal may surface as any exception (see core/signals.py)
        signum = signals.signal_of(err)
        if signum is None:
            raise
        return signals.report(signum)


if __name__ == "__main__":
    sys.exit(main())
