"""Per-parameter gradients of AutoTP tensor parallelism against one process, run on 2 ranks:

    deepspeed --num_gpus 2 tests/helpers/tp_gradients.py --out result.json

Both ranks build the same model and packed batch; the reference is a copy of the model back-
propagated whole in this process. Then DeepSpeed shards the model (tensor_parallel.autotp_size = 2,
ZeRO-0), the engine back-propagates the same batch, and each parameter's gradient shards are
gathered over the group and joined (as pretrain.export joins weights). Writes the largest
differences, stage I and II.
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.models import packed_batch, parallel_test_model  # noqa: E402
from runtime.distributed import init_distributed, shutdown_distributed  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--local_rank", type=int)
args = p.parse_args()
rank, world = init_distributed()
import deepspeed  # noqa: E402

batch = packed_batch()
result = {}
for objective in ("stage1", "stage2"):
    model = parallel_test_model()
    reference = copy.deepcopy(model)
    ref_loss = reference(**batch, objective=objective).loss
    ref_loss.backward()
    ref = {n: torch.zeros_like(q) if q.grad is None else q.grad for n, q in reference.named_parameters()}
    config = {"train_batch_size": 2 * world, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 0}, "tensor_parallel": {"autotp_size": world}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                      config=config)
    loss = engine(**batch, objective=objective).loss
    engine.backward(loss)
    diff = 0.0
    joined = compared = 0
    for name, q in engine.module.named_parameters():
        if q.grad is None:
            assert not ref[name].any(), name  # no gradient here, none in the reference either
            continue
        compared += 1
        shards = [torch.empty_like(q.grad) for _ in range(world)]
        dist.all_gather(shards, q.grad.contiguous())
        full = ref[name].shape
        dims = [d for d in range(len(full)) if q.grad.shape[d] * world == full[d]]
        grad = torch.cat(shards, dims[0]) if q.grad.shape != full else shards[0]
        joined += q.grad.shape != full
        diff = max(diff, float((grad - ref[name]).abs().max()))
    result[objective] = {"loss": [float(ref_loss), float(loss)], "max_abs_diff": diff, "sharded_parameters": joined,
                         "max_abs_grad": max(float(g.abs().max()) for g in ref.values()),
                         "parameters_compared": compared}
    engine.destroy()
if rank == 0:
    Path(args.out).write_text(json.dumps(result, indent=1))
shutdown_distributed()
