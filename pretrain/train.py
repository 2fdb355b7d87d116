"""Pretraining entry point (what `launch/pretrain.sh` runs on every rank).

    deepspeed --num_gpus 2 launch/pretrain.sh --config configs/smoke.yaml train.max_steps=4
    python -m pretrain.train --config configs/smoke.yaml      # one process (world size 1)
"""

import argparse
import contextlib
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from looplm.objectives import shift_labels

from . import checkpoint
from .config import ConfigError, load_config, validate
from .data import BlendedDataset, DataError, IndexedDataset, PackedDataset, RankBatchSampler, Tokenizer, build_loader, parse_blend
from .data.synthetic import prepare_default_corpus, read_eval
from .distributed import is_rank0, shared_out
from .engine import build_engine, build_model, entropy_beta
from .evaluate import task_accuracy, validation_loss
from .metrics import LossGuard, MetricsLogger, flops_per_token


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed runner
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p.parse_args(argv)


def init_distributed():
    import deepspeed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
        release_shared_memory_names()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size()


def release_shared_memory_names():
    """DeepSpeed's CPU all-reduce puts one /dev/shm segment per rank (about 66 MiB) under a name made
    of the master address and port, and never unlinks it, so every run used to leave them behind.
    When init returns, every rank has mapped all its peers' segments; after a barrier each rank
    unlinks its own name. The mappings stay valid and the memory goes back when the run ends, by a
    clean exit, an error, SIGTERM or SIGKILL alike."""
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    (Path("/dev/shm") / name).unlink(missing_ok=True)


def build_data(cfg, model_config, rank):
    """(train dataset, validation dataset, tokenizer, eval tasks) from the config."""
    d = cfg.data
    tasks = {}
    if d.blend is None:  # the embedded default corpus, prepared once by rank 0
        corpus = Path(d.default_corpus_dir)
        if rank == 0:
            prepare_default_corpus(corpus, seed=d.seed)
        dist.barrier()
        entries, tokenizer_path, tasks_dir = [(1.0, str(corpus / "train"))], corpus / "tokenizer.model", corpus
    else:
        entries, tokenizer_path, tasks_dir = parse_blend(d.blend), d.tokenizer, d.eval_tasks_dir
    tokenizer = Tokenizer(tokenizer_path) if tokenizer_path else None
    train_parts, valid_parts = [], []
    for _, prefix in entries:
        indexed = IndexedDataset(prefix, verify_on_read=d.verify_on_read)
        verify_data(indexed, d)
        indexed.check_vocab(model_config.vocab_size)
        if tokenizer is not None:
            indexed.check_tokenizer(tokenizer.identity)
        train_parts.append(PackedDataset(indexed, d.seq_len, d.seed, "train", d.valid_fraction, wrap=True))
        if d.valid_fraction > 0:
            valid_parts.append(PackedDataset(indexed, d.seq_len, d.seed, "valid", d.valid_fraction, wrap=False))
    weights = [w for w, _ in entries]
    train = BlendedDataset(train_parts, weights, d.on_exhaust)
    valid = BlendedDataset(valid_parts, weights, "stop") if valid_parts else None
    if tasks_dir is not None:
        tasks = {p.stem.removeprefix("eval_"): read_eval(p) for p in sorted(Path(tasks_dir).glob("eval_*.jsonl"))}
    return train, valid, tokenizer, tasks


def verify_data(indexed, d) -> None:
    """data.verify at start: the chosen .bin blocks against their checksums, shared out over the ranks;
    a bad block stops every rank (rank 0 names it)."""
    if indexed.num_blocks is None:
        if is_rank0():
            print(f"warning: {indexed.idx_path} has no block checksums (written by an older looplm), so its data "
                  "is not verified; rebuild it with `python -m pretrain.data ingest ... --overwrite`",
                  file=sys.stderr, flush=True)
        return

    def problem(block):
        try:
            indexed.verify_blocks([block])
        except DataError as err:
            return str(err)

    found = sorted((b, msg) for b, msg in shared_out(indexed.choose_blocks(d.verify, d.verify_blocks, d.seed),
                                                    problem).items() if msg)
    if found:
        err = DataError(found[0][1] + (f" ({len(found) - 1} more bad blocks)" if len(found) > 1 else ""))
        err.on_every_rank = True
        raise err


class Preemption:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the end of the step and exits."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def run(cfg, rank: int, world: int):
    """Train according to `cfg`; returns the engine (for tests and tools)."""
    validate(cfg, world)
    checkpoint.seed_globals(cfg.train.seed, rank)  # a resumed run restores them from its checkpoint
    out_dir = Path(cfg.train.output_dir)
    resume_from = None
    if cfg.train.resume == "auto":
        resume_from = checkpoint.find_resume(out_dir)
    elif cfg.train.resume != "none":
        resume_from = Path(cfg.train.resume)
        if not checkpoint.is_complete(resume_from):
            raise ConfigError(f"config key train.resume: {resume_from} is not a complete checkpoint "
                              f"(no {checkpoint.STATE_FILE})")
    state = checkpoint.read_state(resume_from) if resume_from else {}
    universal = bool(state) and state["world_size"] != world and cfg.train.zero_stage > 0

    model = build_model(cfg)
    if cfg.data.seq_len > model.config.max_position_embeddings:  # init_from: known once the model is read
        err = ConfigError(f"config key data.seq_len: {cfg.data.seq_len} is longer than {cfg.model.init_from}'s "
                          f"max_position_embeddings ({model.config.max_position_embeddings}); lower data.seq_len")
        err.on_every_rank = True
        raise err
    train_set, valid_set, tokenizer, tasks = build_data(cfg, model.config, rank)
    engine, optimizer, scheduler = build_engine(cfg, model, world, load_universal=universal)
    device = engine.device
    if resume_from:
        checkpoint.load(engine, resume_from, universal)
    step = state.get("step", 0)
    consumed = state.get("consumed_samples", 0)
    tokens_seen = state.get("tokens_seen", 0)
    guard = LossGuard(cfg.train.spike_factor, cfg.train.spike_window, cfg.train.max_bad_steps,
                      **state.get("guard", {}))
    logger = MetricsLogger(out_dir, cfg, enabled=rank == 0)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        where = f"resumed from {resume_from} (step {step}, {consumed} samples)" if resume_from else "from scratch"
        print(f"looplm pretrain: world {world}, ZeRO-{cfg.train.zero_stage}, "
              f"{sum(p.numel() for p in model.parameters()):,} parameters, {where}", flush=True)

    sampler = RankBatchSampler(cfg.train.global_batch, cfg.train.micro_batch, rank, world, consumed,
                               None if cfg.data.on_exhaust == "wrap" else len(train_set))
    batches = iter(build_loader(train_set, sampler, cfg.data.num_workers))
    accum = sampler.accumulation_steps
    T = model.config.total_ut_steps
    flops = flops_per_token(model.config, cfg.data.seq_len)
    preempt = Preemption()
    base_beta = model.config.entropy_beta

    def save():
        die = cfg.fault.kill_in_save_at_step == step and rank == 0
        checkpoint.save(engine, out_dir, step, {
            "consumed_samples": consumed, "tokens_seen": tokens_seen, "world_size": world,
            "zero_stage": cfg.train.zero_stage, "guard": guard.state(), "config": cfg.to_dict()},
            cfg.train.keep_last, before_commit=(lambda: os.kill(os.getpid(), signal.SIGKILL)) if die else None)

    def evaluate():
        engine.module.eval()
        record = {"step": step}
        if valid_set is not None:
            vs = RankBatchSampler(cfg.train.micro_batch * world, cfg.train.micro_batch, rank, world, 0, len(valid_set))
            it = iter(build_loader(valid_set, vs))
            chunk = [b for _, b in zip(range(cfg.train.eval_batches), it)]
            losses = validation_loss(engine.module, chunk, device)
            if losses is None and rank == 0:
                print(f"warning: eval step {step}: no validation CE: the validation split holds {len(valid_set)} "
                      f"sequences, fewer than one micro-batch per rank ({cfg.train.micro_batch} x {world}); "
                      "raise data.valid_fraction", file=sys.stderr, flush=True)
            elif losses is not None:
                record["valid_loss_per_pass"] = losses
        if tasks and tokenizer is not None and cfg.train.eval_max_prompts > 0:
            record["accuracy"] = task_accuracy(engine.module, tokenizer, tasks, cfg.train.eval_max_prompts, device,
                                               sync=cfg.train.zero_stage == 3)
        engine.module.train()
        valid = record.get("valid_loss_per_pass")
        logger.log(record, f"eval step {step}: " + " ".join(
            ([f"valid CE/pass [{' '.join(f'{x:.3f}' for x in valid)}]"] if valid else []) +
            [f"{k}={v:.2f}" for k, v in sorted(record.get("accuracy", {}).items())]))
        return record

    engine.train()
    while step < cfg.train.max_steps:
        start = time.perf_counter()
        try:
            micro = [next(batches) for _ in range(accum)]
        except StopIteration:
            if rank == 0:
                print(f"data exhausted after {consumed} samples (data.on_exhaust=stop)", flush=True)
            break
        engine.module.config.entropy_beta = entropy_beta(step, cfg, base_beta)
        targets = torch.tensor(float(sum(int((shift_labels(b["labels"]) != -100).sum()) for b in micro)), device=device)
        dist.all_reduce(targets)
        normalizer = targets / (accum * world)  # so that DeepSpeed's /accum and rank mean give a global token mean
        stats = torch.zeros(3 * T + 3, dtype=torch.float64, device=device)
        for i, batch in enumerate(micro):
            if cfg.fault.kill_at_step == step + 1 and rank == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            if cfg.fault.fail_at_step == step + 1 and rank == cfg.fault.fail_rank:
                raise RuntimeError(f"injected failure at step {step + 1} (fault.fail_at_step)")
            batch = {k: v.to(device) for k, v in batch.items()}
            out = engine(**batch, num_items_in_batch=normalizer)
            loss = out.loss * float("nan") if step + 1 in cfg.fault.nan_at_steps else out.loss
            mask = (shift_labels(batch["labels"]) != -100)
            n = mask.sum()
            stats[:T] += out.step_losses.double() * n
            stats[T:2 * T] += (out.exit_probs * mask[..., None]).sum((0, 1)).double()
            stats[2 * T:3 * T] += (out.gate_probs * mask[..., None]).sum((0, 1)).double()
            stats[3 * T] += loss.detach().double()
            stats[3 * T + 1] += n
            if i == accum - 1:  # decide on the update before DeepSpeed steps the optimizer
                stats[3 * T + 2] = float(preempt.requested)
                dist.all_reduce(stats)
                step_loss = (stats[3 * T] / (accum * world)).item()
                bad = guard.check(step_loss)
                _client_optimizer(optimizer).skip_next_step = bad is not None
            engine.backward(loss)
            engine.step()
        step += 1
        consumed += cfg.train.global_batch
        tokens_seen += int(stats[3 * T + 1].item())
        seconds = time.perf_counter() - start
        tokens_per_s = cfg.train.global_batch * cfg.data.seq_len / seconds
        tflops = flops * tokens_per_s / world / 1e12
        n_tok = stats[3 * T + 1].clamp_min(1)
        p = (stats[T:2 * T] / n_tok).tolist()
        record = {
            "step": step, "loss": step_loss, "loss_per_pass": (stats[:T] / n_tok).tolist(), "exit_probs": p,
            "exit_entropy": -sum(x * math.log(max(x, 1e-12)) for x in p),
            "gate_mean": (stats[2 * T:3 * T] / n_tok).tolist(), "grad_norm": _grad_norm(engine),
            "lr": scheduler.get_last_lr()[0], "beta": engine.module.config.entropy_beta,
            "tokens_per_s": tokens_per_s, "tflops_per_device": tflops, "mfu": tflops / cfg.logging.peak_tflops,
            "consumed_samples": consumed, "tokens_seen": tokens_seen, "skipped": bad is not None,
        }
        if bad is not None:
            logger.log({**record, "skip_reason": bad}, f"step {step}: update skipped ({bad})")
            if guard.bad_in_a_row >= cfg.train.max_bad_steps:
                raise RuntimeError(f"{guard.bad_in_a_row} consecutive bad steps (last: {bad}); aborting. The last "
                                   f"good checkpoint is in {checkpoint.checkpoint_root(out_dir)}; lower optim.lr or "
                                   "inspect the data, then resume")
        elif step % cfg.train.log_every == 0 or step == 1:
            logger.log(record, f"step {step:6d} | loss {step_loss:.4f} | CE/pass [" +
                       " ".join(f"{x:.3f}" for x in record["loss_per_pass"]) + "] | exit p [" +
                       " ".join(f"{x:.2f}" for x in p) + f"] | lr {record['lr']:.2e} | {tokens_per_s:,.0f} tok/s"
                       f" | MFU {record['mfu']:.1%}")
        else:
            logger.log(record)
        if stats[3 * T + 2] > 0:
            save()
            if rank == 0:
                print(f"preempted: saved checkpoint at step {step}; resume with train.resume=auto", flush=True)
            logger.close()
            return engine
        if step % cfg.train.save_every == 0 or step in (cfg.train.max_steps, cfg.train.exit_at_step):
            save()
        if step == cfg.train.exit_at_step:
            if rank == 0:
                print(f"stopping at train.exit_at_step={step} (checkpoint saved)", flush=True)
            logger.close()
            return engine
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.max_steps:
            evaluate()
    evaluate()
    logger.log({"step": step, "memory_per_rank": _memory_per_rank(optimizer, device, engine.module)})
    logger.close()
    return engine


def _memory_per_rank(optimizer, device, module) -> list[dict]:
    """Per rank: MiB of optimizer state and of parameters held (what ZeRO 1-2 and 3 shard), and the
    peak memory MiB (CUDA max allocated, else the process's peak RSS)."""
    import resource

    inner = _client_optimizer(optimizer)
    state = sum(t.numel() * t.element_size() for s in inner.state.values() for t in s.values() if torch.is_tensor(t))
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    params = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size()
                 for p in module.parameters())  # ZeRO-3 keeps only its partition (ds_tensor)
    mine = torch.tensor([state / 2**20, params / 2**20, peak / 2**20], dtype=torch.float64, device=device)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [{"optimizer_state_mib": float(x[0]), "param_mib": float(x[1]), "peak_mib": float(x[2])} for x in every]


def _client_optimizer(optimizer):
    """Our SkippableAdamW inside DeepSpeed's optimizer wrappers (or itself for ZeRO-0)."""
    while not hasattr(optimizer, "skip_next_step") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with rank_errors():
        cfg = load_config(args.config, args.overrides)
        rank, world = init_distributed()
        run(cfg, rank, world)
        shutdown_distributed()


INPUT_ERRORS = (ConfigError, DataError)


@contextlib.contextmanager
def rank_errors(input_errors=INPUT_ERRORS):
    """How a rank ends on an error, so that the job's output names the cause once:
    * bad input (config, data, checkpoint: `input_errors`): one line `error: ...`, exit 2; an error
      every rank found together (a damaged checkpoint) is printed by rank 0 alone;
    * a peer's failure seen through a collective (gloo/NCCL): one line saying so, exit 1, so the
      failing rank's own error is the one to read;
    * anything else: the traceback headed by the rank, exit 1.
    The DeepSpeed runner ends the other ranks once one exits non-zero."""
    rank = int(os.environ.get("RANK", "0"))
    where = f" (rank {rank})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    try:
        yield
    except input_errors as err:
        if rank == 0 or not getattr(err, "on_every_rank", False):
            print(f"error{where}: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    except Exception as err:
        if _peer_failure(err):
            print(f"rank {rank}: stopping: a peer rank failed (its error is printed above or below)",
                  file=sys.stderr, flush=True)
        else:
            print(f"error{where}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # no teardown: the process group may wait on the dead peer


def _peer_failure(err: BaseException) -> bool:
    """An error raised by a collective because another rank went away."""
    dist_error = getattr(dist, "DistError", ())
    text = str(err)
    return isinstance(err, dist_error) or any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
        "Socket Timeout", "Timed out waiting"))


def shutdown_distributed():
    """Leave together: a rank that exits while a peer still tears down its communicator can make the
    peer abort (seen with gloo on CPU), so meet at a barrier and destroy the group first."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
