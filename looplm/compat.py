"""The one name that differs across the transformers releases our declared range admits.

transformers 5.24 renamed the KV cache everywhere from `past_key_values` to `cache`: `generate()`
passes it to `forward` as `cache=` and reads it back from the output's `cache` field, and every
`ModelOutput` renames a `past_key_values=` keyword to `cache` before the dataclass `__init__`, so an
output class whose field is still called `past_key_values` can no longer be built. Earlier 5.x
releases use `past_key_values` in both places. Code that names the cache (output fields, keyword
arguments to a Hugging Face model) uses `CACHE_NAME`.
"""

from transformers.generation import utils as _generation

# The names generate() looks for in a model's outputs; the first is the one it passes to forward.
CACHE_NAME = "cache" if "cache" in getattr(_generation, "ALL_CACHE_NAMES", ()) else "past_key_values"


def output_cache(output):
    """The cache a model output carries (None if it carries none), under the installed name."""
    return getattr(output, CACHE_NAME, None)


def cache_argument(cache, past_key_values):
    """A forward's KV cache, given as `cache` or under the name earlier releases pass (not both)."""
    if past_key_values is None:
        return cache
    if cache is not None:
        raise ValueError("pass the KV cache once: as `cache` or as `past_key_values`, not both")
    return past_key_values
