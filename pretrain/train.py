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
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from looplm.objectives import IGNORE_INDEX
from runtime import checkpoint, lock
from runtime.config import ConfigError
from runtime.distributed import init_distributed, is_rank0, rank_errors, shared_out, shutdown_distributed
from runtime.trainer import LoopState, TrainLoop

from . import checkpoint as ds_checkpoint
from . import memory
from .config import check_head_split, load_config, validate
from .data import BlendedDataset, DataError, IndexedDataset, PackedDataset, RankBatchSampler, Tokenizer, build_loader, parse_blend
from .data.synthetic import prepare_default_corpus, read_eval
from .engine import build_engine, build_model, entropy_beta
from .validation import task_accuracy, validation_loss
from .metrics import LossGuard, MetricsLogger, flops_per_token
from .parallel import SequenceParallel, targets_of


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed runner
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p.parse_args(argv)


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

    def indexed(prefix):
        data = IndexedDataset(prefix, verify_on_read=d.verify_on_read)
        verify_data(data, d)
        data.check_vocab(model_config.vocab_size)
        if tokenizer is not None:
            data.check_tokenizer(tokenizer.identity)
        return data

    train_parts, valid_parts = [], []
    for _, prefix in entries:
        data = indexed(prefix)
        train_parts.append(PackedDataset(data, d.seq_len, d.seed, "train", d.valid_fraction, wrap=True))
        if d.valid_fraction > 0:
            valid_parts.append(PackedDataset(data, d.seq_len, d.seed, "valid", d.valid_fraction, wrap=False))
    weights = [w for w, _ in entries]
    if d.valid_blend is not None:  # separate validation data: every document of it, in the blend's weights
        valid_entries = parse_blend(d.valid_blend)
        valid_parts = [PackedDataset(indexed(prefix), d.seq_len, d.seed, "train", 0.0, wrap=False)
                       for _, prefix in valid_entries]
        valid_weights = [w for w, _ in valid_entries]
    else:
        valid_weights = weights
    train = BlendedDataset(train_parts, weights, d.on_exhaust)
    valid = BlendedDataset(valid_parts, valid_weights, "stop") if valid_parts else None
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


@dataclass
class TrainerState(LoopState):
    """What a checkpoint carries besides DeepSpeed's files (trainer_state.json)."""

    consumed_samples: int = 0  # sequences drawn from the training set: where the sampler resumes
    tokens_seen: int = 0  # target tokens trained on
    guard: dict = field(default_factory=dict)  # LossGuard state

    @classmethod
    def read(cls, saved: dict) -> "TrainerState":
        return cls(saved.get("step", 0), saved.get("consumed_samples", 0), saved.get("tokens_seen", 0),
                   saved.get("guard", {}))


class StepStats:
    """Sums over one optimizer step's micro-batches, reduced over the ranks in one all-reduce: named
    fields that are views into one float64 buffer."""

    def __init__(self, passes: int, device):
        sizes = {"ce_per_pass": passes, "exit_probs": passes, "gate_probs": passes, "loss": 1, "targets": 1,
                 "preempt": 1}
        self.buffer = torch.zeros(sum(sizes.values()), dtype=torch.float64, device=device)
        offset = 0
        for name, size in sizes.items():
            setattr(self, name, self.buffer.narrow(0, offset, size))
            offset += size

    @torch.no_grad()
    def add(self, out, loss, mask) -> None:
        """One micro-batch: target-weighted per-pass CE, exit and gate probabilities, its loss."""
        n = mask.sum()
        self.ce_per_pass += out.step_losses.double() * n
        self.exit_probs += (out.exit_probs * mask[..., None]).sum((0, 1)).double()
        self.gate_probs += (out.gate_probs * mask[..., None]).sum((0, 1)).double()
        self.loss += loss.double()
        self.targets += n

    def all_reduce(self) -> None:
        dist.all_reduce(self.buffer)

    def per_target(self, name: str) -> list[float]:
        return (getattr(self, name) / self.targets.clamp_min(1)).tolist()


class Hook:
    """Called by the Trainer at fixed points; the default does nothing. Tests inject faults through it."""

    def before_micro_batch(self, trainer: "Trainer") -> None:
        pass

    def loss(self, trainer: "Trainer", loss: torch.Tensor) -> torch.Tensor:
        return loss

    def before_commit(self, trainer: "Trainer") -> None:
        pass


class FaultInjection(Hook):
    """The `fault:` config section: SIGKILL at a step or inside a save, an error on one rank, NaN losses."""

    def __init__(self, fault):
        self.fault = fault

    def before_micro_batch(self, trainer):
        step, f = trainer.state.step + 1, self.fault
        if f.kill_at_step == step and trainer.rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        if f.fail_at_step == step and trainer.rank == f.fail_rank:
            raise RuntimeError(f"injected failure at step {step} (fault.fail_at_step)")

    def loss(self, trainer, loss):
        return loss * float("nan") if trainer.state.step + 1 in self.fault.nan_at_steps else loss

    def before_commit(self, trainer):
        if self.fault.kill_in_save_at_step == trainer.state.step and trainer.rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)


class Trainer(TrainLoop):
    """One pretraining run: build (model, data, engine; resume), then `train()`: the schedule of
    runtime.trainer.TrainLoop over `train_step`, `log`, `save` and `evaluate`."""

    def __init__(self, cfg, rank: int, world: int, hooks: list[Hook] | None = None):
        validate(cfg, world)
        checkpoint.seed_globals(cfg.train.seed, rank)  # a resumed run restores them from its checkpoint
        self.cfg, self.rank, self.world = cfg, rank, world
        self.out_dir = Path(cfg.train.output_dir)
        fault = cfg.fault
        active = fault.nan_at_steps or any(v is not None for v in (fault.kill_at_step, fault.fail_at_step,
                                                                   fault.kill_in_save_at_step))
        self.hooks = (hooks or []) + ([FaultInjection(fault)] if active else [])
        self.resume_from = checkpoint.resolve_resume(cfg.train.resume, self.out_dir)
        saved = checkpoint.read_state(self.resume_from) if self.resume_from else {}
        sp, tp = cfg.train.sequence_parallel, cfg.train.tensor_parallel
        if saved and saved.get("tensor_parallel", 1) != tp:
            raise ConfigError(f"config key train.tensor_parallel={tp}: the checkpoint {self.resume_from} was written with "
                              f"{saved.get('tensor_parallel', 1)}; resume with that size (export, then train.init_from, "
                              "to change it)")
        universal = bool(saved) and cfg.train.zero_stage > 0 and (
            saved["world_size"], saved.get("sequence_parallel", 1)) != (world, sp)
        if universal and max(saved.get("sequence_parallel", 1), sp) > 1:
            raise ConfigError(f"config key train.sequence_parallel={sp}: the checkpoint {self.resume_from} was written "
                              f"by {saved['world_size']} ranks with train.sequence_parallel="
                              f"{saved.get('sequence_parallel', 1)}, and DeepSpeed's universal checkpoint cannot "
                              "convert a sequence-parallel ZeRO checkpoint; resume with that world size and "
                              "sequence_parallel, or export it and start a run from model.init_from")

        self.model = build_model(cfg)
        parameters = sum(p.numel() for p in self.model.parameters())  # before any sharding
        if cfg.data.seq_len > self.model.config.max_position_embeddings:  # init_from: known once the model is read
            err = ConfigError(f"config key data.seq_len: {cfg.data.seq_len} is longer than {cfg.model.init_from}'s "
                              f"max_position_embeddings ({self.model.config.max_position_embeddings}); lower "
                              "data.seq_len")
            err.on_every_rank = True
            raise err
        self.train_set, self.valid_set, self.tokenizer, self.tasks = build_data(cfg, self.model.config, rank)
        check_head_split(self.model.config, sp, "train.sequence_parallel")  # init_from: known only now
        check_head_split(self.model.config, tp, "train.tensor_parallel")
        self.sp = SequenceParallel(self.model, sp) if sp > 1 else None
        # Data-parallel ranks: a sequence-parallel group shares its samples (one slice each), a tensor-
        # parallel group sees the same samples whole (`replicas` copies of each token's statistics).
        self.dp, self.replicas = world // (sp * tp), tp
        self.dp_rank = rank // (sp * tp)  # groups are consecutive ranks
        self.engine, self.optimizer, self.scheduler = build_engine(cfg, self.model, world, load_universal=universal,
                                                                   mpu=self.sp and self.sp.mpu)
        self.device = self.engine.device
        if self.resume_from:
            ds_checkpoint.load(self.engine, self.resume_from, universal)
        self.state = TrainerState.read(saved)
        t = cfg.train
        self.guard = LossGuard(t.spike_factor, t.spike_window, t.max_bad_steps, **self.state.guard)
        self.logger = MetricsLogger(self.out_dir, cfg, enabled=rank == 0)
        sampler = RankBatchSampler(t.global_batch, t.micro_batch, self.dp_rank, self.dp, self.state.consumed_samples,
                                   None if cfg.data.on_exhaust == "wrap" else len(self.train_set))
        self.batches = iter(build_loader(self.train_set, sampler, cfg.data.num_workers))
        self.accum = sampler.accumulation_steps
        self.flops = flops_per_token(self.model.config, cfg.data.seq_len)
        self.base_beta = self.model.config.entropy_beta
        self.max_steps, self.save_every = t.max_steps, t.save_every
        self.exit_at_step, self.eval_every = t.exit_at_step, t.eval_every
        if rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            where = (f"resumed from {self.resume_from} (step {self.state.step}, {self.state.consumed_samples} "
                     "samples)" if self.resume_from else "from scratch")
            print(f"looplm pretrain: world {world}" + (f" (sequence parallel {sp})" if sp > 1 else "") +
                  (f" (tensor parallel {tp})" if tp > 1 else "") +
                  f", ZeRO-{t.zero_stage}, {parameters:,} parameters, {where}", flush=True)
            print("\n".join(memory.estimate(cfg, self.model.config, world).lines()), flush=True)

    def train(self):
        """Run to train.max_steps (or exit_at_step, preemption, exhausted data); returns the engine."""
        self.engine.train()
        super().train()
        return self.engine

    def finish(self) -> None:
        self.evaluate()
        self.logger.log({"step": self.state.step,
                         "memory_per_rank": _memory_per_rank(self.optimizer, self.device, self.engine.module)})
        self.logger.close()

    def stop(self, message: str) -> None:
        super().stop(message)
        self.logger.close()

    def preempted(self, stats: "StepStats") -> bool:
        return stats.preempt.item() > 0  # reduced with the step's statistics

    def train_step(self) -> StepStats | None:
        """One optimizer step over `accum` micro-batches: the loss is a mean over every target token of
        the global batch; a bad loss (LossGuard) vetoes the update (`stats.bad` says why). Returns the
        reduced statistics, or None when data.on_exhaust=stop and the data ran out."""
        cfg, device, accum, dp = self.cfg, self.device, self.accum, self.dp
        try:
            micro = [next(self.batches) for _ in range(accum)]
        except StopIteration:
            if self.rank == 0:
                print(f"data exhausted after {self.state.consumed_samples} samples (data.on_exhaust=stop)", flush=True)
            return None
        if self.sp is not None:  # this rank's slice of each sequence (+ the whole sequence's attention mask)
            micro = [self.sp.shard(b) for b in micro]
        beta = entropy_beta(self.state.step, cfg, self.base_beta)
        targets = torch.tensor(float(sum(int((targets_of(b) != IGNORE_INDEX).sum()) for b in micro)), device=device)
        dist.all_reduce(targets)
        targets /= self.replicas
        # DeepSpeed divides by accum and averages over the data-parallel ranks (summing over a sequence-
        # parallel group): with this normaliser the gradient is that of the global token mean.
        normalizer = targets / (accum * dp)
        stats, bad = StepStats(self.model.config.total_ut_steps, device), None
        for i, batch in enumerate(micro):
            for hook in self.hooks:
                hook.before_micro_batch(self)
            if self.sp is not None:
                self.sp.mask = batch.pop("mask")
            batch = {k: v.to(device) for k, v in batch.items()}
            out = self.engine(**batch, num_items_in_batch=normalizer, objective=cfg.ouro.objective, entropy_beta=beta)
            loss = out.loss
            for hook in self.hooks:
                loss = hook.loss(self, loss)
            stats.add(out, loss, targets_of(batch) != IGNORE_INDEX)
            if i == accum - 1:  # decide on the update before DeepSpeed steps the optimizer
                stats.preempt += float(self.preemption.requested)
                stats.all_reduce()
                bad = self.guard.check(self.mean_loss(stats))
                _client_optimizer(self.optimizer).skip_next_step = bad is not None
            self.engine.backward(loss)
            self.engine.step()
        self.state.step += 1
        self.state.consumed_samples += cfg.train.global_batch
        self.state.tokens_seen += int(stats.targets.item()) // self.replicas
        stats.beta, stats.bad = beta, bad
        return stats

    def mean_loss(self, stats: StepStats) -> float:
        """The step's loss: the reduced sum of every rank's micro-batch losses, each counted once."""
        return (stats.loss / (self.accum * self.dp * self.replicas)).item()

    def log(self, stats: StepStats, seconds: float) -> None:
        """The step's record to metrics.jsonl (every step) and the console (every log_every steps); a bad
        step is always reported, and too many in a row abort the run."""
        cfg, step, bad = self.cfg, self.state.step, stats.bad
        tokens_per_s = cfg.train.global_batch * cfg.data.seq_len / seconds
        tflops = self.flops * tokens_per_s / self.world / 1e12
        p = stats.per_target("exit_probs")
        loss = self.mean_loss(stats)
        record = {
            "step": step, "loss": loss, "loss_per_pass": stats.per_target("ce_per_pass"), "exit_probs": p,
            "exit_entropy": -sum(x * math.log(max(x, 1e-12)) for x in p),
            "gate_mean": stats.per_target("gate_probs"), "grad_norm": _grad_norm(self.engine),
            "lr": self.scheduler.get_last_lr()[0], "beta": stats.beta,
            "tokens_per_s": tokens_per_s, "tflops_per_device": tflops, "mfu": tflops / cfg.logging.peak_tflops,
            "consumed_samples": self.state.consumed_samples, "tokens_seen": self.state.tokens_seen,
            "skipped": bad is not None,
        }
        if bad is not None:
            self.logger.log({**record, "skip_reason": bad}, f"step {step}: update skipped ({bad})")
            if self.guard.bad_in_a_row >= cfg.train.max_bad_steps:
                raise RuntimeError(f"{self.guard.bad_in_a_row} consecutive bad steps (last: {bad}); aborting. The "
                                   f"last good checkpoint is in {checkpoint.checkpoint_root(self.out_dir)}; lower "
                                   "optim.lr or inspect the data, then resume")
        elif step % cfg.train.log_every == 0 or step == 1:
            self.logger.log(record, f"step {step:6d} | loss {loss:.4f} | CE/pass [" +
                            " ".join(f"{x:.3f}" for x in record["loss_per_pass"]) + "] | exit p [" +
                            " ".join(f"{x:.2f}" for x in p) + f"] | lr {record['lr']:.2e} | {tokens_per_s:,.0f} tok/s"
                            f" | MFU {record['mfu']:.1%}")
        else:
            self.logger.log(record)

    def save(self) -> Path:
        s, cfg = self.state, self.cfg
        return ds_checkpoint.save(self.engine, self.out_dir, s.step, {
            "consumed_samples": s.consumed_samples, "tokens_seen": s.tokens_seen, "world_size": self.world,
            "sequence_parallel": cfg.train.sequence_parallel, "tensor_parallel": cfg.train.tensor_parallel,
            "zero_stage": cfg.train.zero_stage, "guard": self.guard.state(), "config": cfg.to_dict()},
            cfg.train.keep_last, before_commit=lambda: [hook.before_commit(self) for hook in self.hooks])

    def evaluate(self) -> dict:
        """Validation CE per pass and exact-match accuracy of the eval tasks per exit pass (collective).
        Whole sequences on every rank, also under sequence parallelism."""
        cfg, rank, step, module = self.cfg, self.rank, self.state.step, self.engine.module
        dp_rank, dp = self.dp_rank, self.dp  # a model-parallel group evaluates the same data
        module.eval()
        record = {"step": step}
        with self.sp.disabled() if self.sp is not None else contextlib.nullcontext():
            if self.valid_set is not None:
                vs = RankBatchSampler(cfg.train.micro_batch * dp, cfg.train.micro_batch, dp_rank, dp, 0,
                                      len(self.valid_set))
                it = iter(build_loader(self.valid_set, vs))
                chunk = [b for _, b in zip(range(cfg.train.eval_batches), it)]
                losses = validation_loss(module, chunk, self.device)
                if losses is None and rank == 0:
                    print(f"warning: eval step {step}: no validation CE: the validation split holds "
                          f"{len(self.valid_set)} sequences, fewer than one micro-batch per rank "
                          f"({cfg.train.micro_batch} x {dp}); raise data.valid_fraction or give data.valid_blend more data", file=sys.stderr, flush=True)
                elif losses is not None:
                    record["valid_loss_per_pass"] = losses
            if self.tasks and self.tokenizer is not None and cfg.train.eval_max_prompts > 0:
                record["accuracy"] = task_accuracy(module, self.tokenizer, self.tasks, cfg.train.eval_max_prompts,
                                                   self.device, sync=cfg.train.zero_stage == 3, rank=dp_rank, world=dp)
        module.train()
        valid = record.get("valid_loss_per_pass")
        self.logger.log(record, f"eval step {step}: " + " ".join(
            ([f"valid CE/pass [{' '.join(f'{x:.3f}' for x in valid)}]"] if valid else []) +
            [f"{k}={v:.2f}" for k, v in sorted(record.get("accuracy", {}).items())]))
        return record


def run(cfg, rank: int, world: int, hooks: list[Hook] | None = None):
    """Train according to `cfg`; returns the engine (for tests and tools). The output folder is this
    job's alone while it runs (runtime/lock.py)."""
    validate(cfg, world)
    with lock.held(cfg.train.output_dir):
        return Trainer(cfg, rank, world, hooks).train()


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
    with rank_errors((ConfigError, DataError)):
        cfg = load_config(args.config, args.overrides)
        rank, world = init_distributed()
        run(cfg, rank, world)
        shutdown_distributed(exit_process=True)


if __name__ == "__main__":
    main()
