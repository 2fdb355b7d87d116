"""The one error type of the data pipeline: bad input, named, with the fix."""


class DataError(ValueError):
    """Bad data-pipeline input (file, tokenizer, index, config). The message names the input,
    says what is wrong and how to fix it; command-line entry points print it and exit 1."""


def cli_main(main=None, *, errors: tuple = (DataError,), code: int = 1):
    """Wrap a CLI `main(argv)` so that an input error (`errors`) prints one clean line and exits
    with `code`. Use bare (`@cli_main`) or with arguments (`@cli_main(errors=(...), code=2)`)."""
    import functools
    import sys

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
