"""Tokenizers from a local path: a Hugging Face tokenizer folder or a sentencepiece model, behind one
small interface; plus training a sentencepiece model on a corpus.

    python -m pretrain.data train-tokenizer --input corpus.jsonl [--text-field text] --vocab-size 512 --output tok.model
"""

import argparse
import hashlib
import json
from pathlib import Path

from runtime.cli import cli_main

from .errors import DataError


class Tokenizer:
    """encode(text) -> list[int]; eos_id; vocab_size; identity (kind, name, sha256 of its files)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.exists():
            raise DataError(f"tokenizer {path} does not exist; pass a Hugging Face tokenizer folder or a .model file")
        self.path = path
        if path.is_dir():
            self.kind = "huggingface"
            from transformers import AutoTokenizer

            try:
                self._hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            except Exception as err:  # transformers raises many types for an unusable folder
                raise DataError(f"tokenizer folder {path} could not be loaded ({err}); it needs tokenizer.json or "
                                "the files AutoTokenizer reads") from err
            self.eos_id = self._hf.eos_token_id
            self.vocab_size = len(self._hf)
            files = sorted(p for p in path.iterdir() if p.is_file() and "token" in p.name)
        else:
            self.kind = "sentencepiece"
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor()
            try:
                self._sp.Load(str(path))
            except (OSError, RuntimeError) as err:
                raise DataError(f"tokenizer {path} is not a sentencepiece model ({err})") from err
            self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
            self.vocab_size = self._sp.GetPieceSize()
            files = [path]
        if self.eos_id is None:
            raise DataError(f"tokenizer {path} has no EOS token; documents need one appended (set eos_token)")
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.name.encode() + b"\0" + f.read_bytes())
        self.identity = {"kind": self.kind, "name": path.name, "sha256": digest.hexdigest()}

    def encode(self, text: str) -> list[int]:
        if self.kind == "huggingface":
            return self._hf.encode(text, add_special_tokens=False)
        return self._sp.EncodeAsIds(text)

    def decode(self, ids) -> str:
        """Text of the ids; ids past the tokenizer's vocabulary (a model's padded rows) are skipped."""
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        if self.kind == "huggingface":
            return self._hf.decode(ids, skip_special_tokens=True)
        return self._sp.DecodeIds(ids)


def train_sentencepiece(texts, output: str | Path, vocab_size: int, model_type: str = "bpe",
                        user_symbols: list[str] | None = None, real_text: bool = False) -> Tokenizer:
    """Train a sentencepiece model on an iterable of strings; writes `output` (.model) and returns it.
    Single-threaded and unshuffled, so the same corpus gives the same model. `real_text`: characters
    unseen in training fall back to UTF-8 bytes (256 byte pieces, no unknown token in practice) and
    runs of spaces are kept (indentation, verse layout)."""
    import sentencepiece as spm

    output = Path(output)
    if output.suffix != ".model":
        raise DataError(f"sentencepiece output {output} must end in .model")
    output.parent.mkdir(parents=True, exist_ok=True)
    texts = [t for t in texts if t]
    if not texts:
        raise DataError("cannot train a tokenizer on an empty corpus")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_prefix=str(output.with_suffix("")), vocab_size=vocab_size,
            model_type=model_type, character_coverage=1.0, num_threads=1, shuffle_input_sentence=False,
            input_sentence_size=0, bos_id=-1, eos_id=1, unk_id=0, pad_id=-1, minloglevel=2,
            user_defined_symbols=user_symbols or [], hard_vocab_limit=False,
            byte_fallback=real_text, remove_extra_whitespaces=not real_text,
        )
    except RuntimeError as err:
        raise DataError(f"sentencepiece training failed: {err}") from err
    return Tokenizer(output)


def read_texts(path: Path, text_field: str):
    """Strings from a .txt (one per line) or .json/.jsonl (the `text_field` of each record)."""
    if not path.exists():
        raise DataError(f"corpus {path} does not exist")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if path.suffix == ".txt":
                yield line.rstrip("\n")
                continue
            if not line.strip():
                continue
            try:
                yield json.loads(line)[text_field]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(f"{path}:{n}: not a JSON record with a {text_field!r} field ({err})") from err


@cli_main(errors=(DataError,))
def main(argv=None):
    p = argparse.ArgumentParser(description="Train a sentencepiece tokenizer on a corpus.")
    p.add_argument("--input", required=True, type=Path, help=".txt (a document per line) or .jsonl")
    p.add_argument("--text-field", default="text")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram", "char", "word"])
    p.add_argument("--output", required=True, type=Path, help="path of the .model to write")
    args = p.parse_args(argv)
    tok = train_sentencepiece(read_texts(args.input, args.text_field), args.output, args.vocab_size, args.model_type)
    print(f"wrote {args.output}: {tok.vocab_size} pieces, eos id {tok.eos_id}")

