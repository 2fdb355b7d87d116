"""lm-evaluation-harness tasks over local held-out files: one looplm_<task>.yaml per eval_<task>.jsonl.

    python -m lm_eval_tasks.make_task --eval runs/smoke/data/eval_mano.jsonl runs/smoke/data/eval_multihop.jsonl
    lm_eval --model hf --model_args pretrained=runs/smoke/hf,trust_remote_code=True \
        --tasks looplm_mano,looplm_multihop --include_path lm_eval_tasks/tasks --device cpu --batch_size 1

Each written YAML includes tasks/_looplm_template_yaml (greedy generation, exact match of the first
word) and names its data file by absolute path, so lm_eval reads it from any working directory. Only
held-out files are accepted: records must be {"prompt", "answer"} (a training file's {"text"} is
refused), and where the corpus's train.jsonl lies beside the file, no prompt may be a training document.
"""

import argparse
import json
from pathlib import Path

from pretrain.data.errors import DataError
from pretrain.data.synthetic import read_eval
from runtime.cli import cli_main
from runtime.config import ConfigError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
TEMPLATE = TASKS_DIR / "_looplm_template_yaml"


def task_name(eval_file: Path) -> str:
    stem = eval_file.stem
    return "looplm_" + (stem[len("eval_"):] if stem.startswith("eval_") else stem)


def check_held_out(eval_file: Path) -> int:
    """The number of records; raises ConfigError for a file that is not a held-out task file."""
    if not eval_file.is_file():
        raise ConfigError(f"{eval_file} does not exist")
    try:
        prompts = [prompt for prompt, _ in read_eval(eval_file)]
    except DataError as err:
        raise ConfigError(str(err)) from err
    if not prompts:
        raise ConfigError(f"{eval_file} holds no records")
    train = eval_file.with_name("train.jsonl")
    if train.is_file():  # the rule the corpus was made with (pretrain/data/synthetic.py default_corpus)
        with open(train, encoding="utf-8") as f:
            seen = {json.loads(line)["text"].rsplit(" ", 1)[0] for line in f if line.strip()}
        leaked = [p for p in prompts if p in seen]
        if leaked:
            raise ConfigError(f"{eval_file}: {len(leaked)} prompts are training documents of {train} "
                              f"(first: {leaked[0]!r}); evaluate on held-out problems only")
    return len(prompts)


def write_task(eval_file: str | Path, out_dir: str | Path = TASKS_DIR) -> Path:
    """Write out_dir/looplm_<task>.yaml for `eval_file`; returns its path."""
    eval_file = Path(eval_file).resolve()
    check_held_out(eval_file)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    name = task_name(eval_file)
    include = TEMPLATE.name if out_dir == TASKS_DIR else str(TEMPLATE)
    path = out_dir / f"{name}.yaml"
    # JSON strings are valid YAML scalars: any path is quoted correctly
    path.write_text(f"# written by python -m lm_eval_tasks.make_task from {eval_file.name}\n"
                    f"include: {json.dumps(include)}\n"
                    f"task: {name}\n"
                    f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(eval_file))}\n", encoding="utf-8")
    return path


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval", nargs="+", required=True, type=Path, help="held-out eval_<task>.jsonl files")
    p.add_argument("--out", type=Path, default=TASKS_DIR, help="folder for the YAMLs (lm_eval --include_path)")
    args = p.parse_args(argv)
    for eval_file in args.eval:
        path = write_task(eval_file, args.out)
        print(f"{path.stem}: {path}")


if __name__ == "__main__":
    main()
