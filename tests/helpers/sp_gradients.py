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

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from looplm import LoopLMForCausalLM, preset_config  # noqa: E402
from pretrain.parallel import SequenceParallel  # noqa: E402
from runtime.distributed import init_distributed, shutdown_distributed  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--local_rank", type=int)
args = p.parse_args()
rank, world = init_distributed()
torch.manual_seed(0)
model = LoopLMForCausalLM(preset_config("tiny", vocab_size=128, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=16, total_ut_steps=3))
S = 32
ids = torch.randint(0, 128, (2, S))
positions = torch.cat([torch.arange(n) for n in (5, 14, 13)] + [torch.arange(n) for n in (20, 12)]).view(2, S)
labels = torch.where(positions == 0, -100, ids)
labels[0, 7] = -100  # an ignored target inside a document
batch = {"input_ids": ids, "position_ids": positions, "labels": labels}
targets = int((labels[:, 1:] != -100).sum())


def gradients(**kw):
    model.zero_grad(set_to_none=True)
    loss = model(**kw).loss
    loss.backward()
    return loss.detach(), {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}


result = {}
for objective in ("stage1", "stage2"):
    ref_loss, ref = gradients(**batch, objective=objective)
    sp = SequenceParallel(model, world)
    part = sp.shard(batch)
    sp.mask = part.pop("mask")
    loss, grads = gradients(**part, objective=objective, num_items_in_batch=targets)
    for attn in sp.layers:  # back to whole sequences for the next reference
        attn.attention_fn = None
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
