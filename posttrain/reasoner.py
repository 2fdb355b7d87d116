"""The frozen reasoner: any Hugging Face causal LM from a local path (a LoopLM or e.g. SmolLM3),
used only through the standard interface: input embeddings, `inputs_embeds`, the KV cache (`cache`,
`past_key_values` before transformers 5.24: looplm/compat.py),
logits and the last hidden state."""

from pathlib import Path

import torch


class ReasonerError(ValueError):
    """A reasoner that cannot be used: the message names the path and the fix."""


def load_reasoner(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a causal LM from a local folder, frozen (no gradients, eval mode)."""
    import looplm  # noqa: F401  (registers model_type "ouro")
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
