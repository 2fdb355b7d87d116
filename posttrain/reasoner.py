"""The frozen reasoner: any Hugging Face causal LM from a local path (a LoopLM or e.g. SmolLM3),
used only through the standard interface: input embeddings, `inputs_embeds`, the KV cache (`cache`,
`past_key_values` before transformers 5.24: looplm/compat.py),
logits and the last hidden state.

Everything in posttrain talks to a reasoner (or the weaver's LM) through this module: loading,
left-padded prompts, forwards on embeddings with a padding mask (position ids from the mask).
"""

from pathlib import Path

import torch

from looplm import left_pad, position_ids_from_mask  # importing looplm registers model_type "ouro" too
from looplm.compat import CACHE_NAME


class ReasonerError(ValueError):
    """A reasoner that cannot be used: the message names the path and the fix."""


def load_reasoner(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a causal LM from a local folder, frozen (no gradients, eval mode)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").exists():
        raise ReasonerError(f"reasoner {path} is not a Hugging Face model folder (no config.json); pass the "
                            "folder written by save_pretrained or `python -m pretrain.export`")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        raise ReasonerError(f"reasoner {path} could not be loaded: {err}") from err
    return freeze(model)


def load_tokenizer(reasoner_path: str | Path, tokenizer: str | Path | None = None):
    """The reasoner's tokenizer: `tokenizer` if given, else the reasoner folder's tokenizer.model
    (a LoopLM export) or its Hugging Face tokenizer files."""
    from pretrain.data import Tokenizer

    path = Path(tokenizer or reasoner_path)
    return Tokenizer(path / "tokenizer.model" if (path / "tokenizer.model").exists() else path)


def freeze(model):
    model.requires_grad_(False)
    return model.eval()


def hidden_size(model) -> int:
    return model.get_input_embeddings().weight.shape[1]


def last_hidden(outputs) -> torch.Tensor:
    """The final hidden state (B, S, d) of a forward run with output_hidden_states=True; for a LoopLM,
    the output of the last pass."""
    return outputs.hidden_states[-1]


def embed(model, ids: torch.Tensor) -> torch.Tensor:
    """Input embeddings of token ids (..., S) -> (..., S, d)."""
    return model.get_input_embeddings()(ids)


def prompt_embeds(model, prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt embeddings (B, S, d), zero at padding, and mask (B, S)."""
    ids, mask = left_pad(prompts, pad_id, model.get_input_embeddings().weight.device)
    return embed(model, ids) * mask[..., None], mask


def forward_embeds(model, embeds: torch.Tensor, mask: torch.Tensor, cache=None, use_cache: bool = False, **kwargs):
    """Run `model` on input embeddings (B, S_new, d). mask (B, S), 1 = real input, covers the cached
    inputs and the new ones (S = cached + S_new); positions come from it (`position_ids_from_mask`), so
    padding takes none. cache: the KV cache of the earlier inputs (None: there are none); use_cache:
    return the extended cache (`looplm.compat.output_cache(out)`). kwargs go to the model (e.g.
    output_hidden_states=True). Returns the model's output."""
    positions = position_ids_from_mask(mask)[:, mask.shape[1] - embeds.shape[1]:]
    if cache is not None:
        kwargs[CACHE_NAME] = cache
    return model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=use_cache, **kwargs)
