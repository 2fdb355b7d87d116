"""The one error type of the data pipeline: bad input, named, with the fix."""


class DataError(ValueError):
    """Bad data-pipeline input (file, tokenizer, index, config). The message names the input,
    says what is wrong and how to fix it; command-line entry points print it and exit 1."""
