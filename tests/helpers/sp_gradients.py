"""Per-parameter gradients of sequence parallelism against one process, run on 2 ranks:

    deepspeed --num_gpus 2 tests/helpers/sp_gradients.py --out result.json

Both ranks build the same model and the same packed batch. The reference is the whole sequence
without sequence parallelism; then pretrain.parallel.SequenceParallel splits it over the 2 ranks,
each rank back-propagates its slice's loss (normalised by the global target count) and the
gradients are summed over the group, as DeepSpeed does. Writes the largest differences (stage I and II).
"""

import argparse
import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.models import packed_batch, parallel_test_model  # noqa: E402
from pretrain.parallel import SequenceParallel  # noqa: E402
from runtime.distributed import init_distributed, shutdown_distributed  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--local_rank", type=int)
args = p.parse_args()
rank, world = init_distributed()
model = parallel_test_model()
batch = packed_batch()
targets = int((batch["labels"][:, 1:] != -100).sum())
sp = SequenceParallel(model, world)


def gradients(**kw):
    model.zero_grad(set_to_none=True)
    loss = model(**kw).loss
    loss.backward()
    return loss.detach(), {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}


result = {}
for objective in ("stage1", "stage2"):
    with sp.disabled():  # the reference: the whole sequence, plain attention
        ref_loss, ref = gradients(**batch, objective=objective)
    part = sp.shard(batch)
    sp.mask = part.pop("mask")
    loss, grads = gradients(**part, objective=objective, num_items_in_batch=targets)
    dist.all_reduce(loss)
    for g in grads.values():
        dist.all_reduce(g)
    result[objective] = {
        "loss": [float(ref_loss), float(loss)],
        "parameters": len(ref), "same_parameters": sorted(ref) == sorted(grads),
        "max_abs_diff": max(float((grads[n] - ref[n]).abs().max()) for n in ref),
        "max_abs_grad": max(float(g.abs().max()) for g in ref.values()),
    }
if rank == 0:
    Path(args.out).write_text(json.dumps(result, indent=1))
shutdown_distributed()
