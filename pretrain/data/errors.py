"""The one error type of the data pipeline: bad input, named, with the fix."""


class DataError(ValueError):
    """Bad data-pipeline input (file, tokenizer, index, config). The message names the input,
    says what is wrong and how to fix it; command-line entry points print it and exit 1."""


def cli_main(main):
    """Wrap a CLI `main(argv)` so a DataError prints one clean line and exits non-zero."""
    import sys

    def run(argv=None):
        try:
            return main(argv)
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(1)

    return run
