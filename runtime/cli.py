"""Command-line entry points of both systems: bad input ends with one clean line, not a traceback."""

import functools
import sys

from .config import ConfigError


def cli_main(main=None, *, errors: tuple = (ConfigError,), code: int = 1):
    """Wrap a CLI `main(argv)` so that an input error (`errors`) prints `error: <message>` and exits
    with `code`. Use bare (`@cli_main`) or with arguments (`@cli_main(errors=(DataError,), code=2)`)."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(argv=None):
            try:
                return fn(argv)
            except errors as err:
                print(f"error: {err}", file=sys.stderr)
                raise SystemExit(code)
        return run

    return wrap(main) if main is not None else wrap
