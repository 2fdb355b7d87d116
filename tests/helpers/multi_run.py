"""Run several training configs one after another in one distributed job (saves process start-ups):

    deepspeed --num_gpus 2 tests/helpers/multi_run.py --config configs/smoke.yaml --runs runs.json

runs.json: a list of override lists.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pretrain.config import load_config  # noqa: E402
from pretrain.train import run  # noqa: E402
from runtime.distributed import init_distributed, shutdown_distributed  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--config", required=True)
p.add_argument("--runs", required=True)
p.add_argument("--local_rank", type=int)
args = p.parse_args()
rank, world = init_distributed()
for overrides in json.loads(Path(args.runs).read_text()):
    run(load_config(args.config, overrides), rank, world)
shutdown_distributed()
