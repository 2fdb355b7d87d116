"""The KV cache travels under the name the installed transformers uses (looplm/compat.py): every
output class of looplm is built the way generate() builds and reads it back between steps."""

import inspect

import pytest
import torch
from transformers import GenerationMixin
from transformers.utils import ModelOutput

import looplm.model  # noqa: F401  (defines the output classes)
from helpers.models import tiny_model
from looplm import LoopCache
from looplm.compat import CACHE_NAME, output_cache


def generation_cache_name() -> str:
    """The keyword under which generate() hands the cache to forward, read from transformers itself."""
    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return next(name for name in ("cache", "past_key_values") if name in params)


def looplm_output_classes() -> list[type]:
    found, todo = [], [ModelOutput]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith("looplm"):
            found.append(cls)
    return sorted(found, key=lambda c: c.__name__)


def test_the_compat_name_is_the_one_generate_uses():
    assert CACHE_NAME == generation_cache_name()


def test_all_output_classes_are_found():
    assert {c.__name__ for c in looplm_output_classes()} >= {"LoopLMOutput", "LoopLMModelOutput"}


@pytest.mark.parametrize("cls", looplm_output_classes(), ids=lambda c: c.__name__)
def test_every_output_class_carries_the_cache_through_generate(cls):
    name, cache = generation_cache_name(), LoopCache(2)
    out = cls(**{name: cache})  # as a model's forward builds it under this transformers
    assert output_cache(out) is cache
    step = {"use_cache": True, "cache_position": torch.arange(3)}  # early 5.x releases advance cache_position
    kwargs = tiny_model()._update_model_kwargs_for_generation(out, step)
    assert kwargs[name] is cache  # generate() feeds it to the next step


@torch.no_grad()
def test_the_cache_keyword_and_its_old_name_are_the_same_argument():
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 6))
    new, old = LoopCache(2), LoopCache(2)
    out_new = model(ids, cache=new, use_cache=True)
    out_old = model(ids, past_key_values=old, use_cache=True)
    assert output_cache(out_new) is new and output_cache(out_old) is old
    torch.testing.assert_close(out_new.logits, out_old.logits)
    torch.testing.assert_close(new.keys[0], old.keys[0])
    with pytest.raises(ValueError, match="once"):
        model(ids, cache=LoopCache(2), past_key_values=LoopCache(2), use_cache=True)
