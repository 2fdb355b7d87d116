"""Tiny tokenizers and corpora built by the tests themselves."""

import json
from pathlib import Path

from pretrain.data import train_sentencepiece

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def corpus(n: int = 60, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def write_jsonl(path: Path, texts, field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


def sp_tokenizer(tmp: Path, vocab_size: int = 96) -> Path:
    path = tmp / "sp.model"
    if not path.exists():
        train_sentencepiece(corpus(200, seed=1), path, vocab_size)
    return path


def hf_tokenizer(tmp: Path) -> Path:
    """A word-level Hugging Face tokenizer folder (tokenizer.json + config) with an EOS token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp / "hf_tok"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(folder)
    return folder
