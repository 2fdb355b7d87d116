"""Data-pipeline commands: python -m pretrain.data {prepare,ingest,train-tokenizer,inspect,synthetic,word-problems,chains,shakespeare} [args]"""

import sys

from .chains import main as chains_main
from .indexed import main as inspect_main
from .ingest import main as ingest_main
from .shakespeare import main as shakespeare_main
from .synthetic import main as synthetic_main
from .text_corpus import main as prepare_main
from .tokenizer import main as tokenizer_main
from .word_problems import main as word_problems_main

COMMANDS = {"prepare": prepare_main, "ingest": ingest_main, "train-tokenizer": tokenizer_main, "inspect": inspect_main,
            "synthetic": synthetic_main, "word-problems": word_problems_main,
            "chains": chains_main, "shakespeare": shakespeare_main}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        raise SystemExit(2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
