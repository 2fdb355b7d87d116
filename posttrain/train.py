"""Post-training of the weaver (SFT, GRPO) and of the learned trigger, with the reasoner frozen.

    python -m posttrain.train --config configs/posttrain_sft.yaml [section.key=value ...]

Checkpoints (`output_dir/checkpoints/step_N/`) hold only what trains: weaver.safetensors + weaver.json
(which names the reasoner), trigger.safetensors, the optimizer state, the RNG state and
trainer_state.json; `latest` moves last. `train.resume=auto` continues exactly.
"""

import argparse
import copy
import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from looplm.objectives import IGNORE_INDEX, shift_labels
from runtime import checkpoint, lock
from runtime.config import ConfigError
from runtime.distributed import init_distributed, rank_errors, shutdown_distributed
from runtime.trainer import LoopState, TrainLoop

from .augment import (Completions, batch_splices, delimiter_ids, score_completions, splice, splice_completions,
                      token_log_probs)
from .config import PostConfig, load_config
from .correctness import CorrectnessHead, auroc, head_inputs, load_head
from .data import ProblemError, load_problems
from .grpo import group_advantages, grpo_loss, mixed_groups
from .reasoner import ReasonerError, freeze, hidden_size, load_reasoner, load_tokenizer
from .trigger import FixedTrigger, build_trigger
from .weaver import Weaver, decoding


class System:
    """Reasoner (frozen), weaver and trigger built from a config; what the trainers share."""

    def __init__(self, cfg: PostConfig):
        self.cfg = cfg
        self.reasoner = load_reasoner(cfg.reasoner.path)
        self.tok = load_tokenizer(cfg.reasoner.path, cfg.reasoner.tokenizer)
        self.weaver = Weaver(self.reasoner, replace(cfg.weaver, reasoner=cfg.reasoner.path))
        if cfg.weaver.init_from:
            self.weaver.load(cfg.weaver.init_from)
        d = hidden_size(self.reasoner)
        self.trigger = build_trigger(cfg.trigger.policy, d)
        if cfg.trigger.init_from:
            self.trigger.load_state_dict(load_file(Path(cfg.trigger.init_from) / "trigger.safetensors"))
        # GRPO's KL anchor: the weaver as it starts (before any resume), frozen
        self.reference = (freeze(copy.deepcopy(self.weaver)) if cfg.train.mode == "grpo" and cfg.train.kl_beta
                          else None)
        self.head = None
        if cfg.train.joint_head:
            self.head = load_head(cfg.train.head_init_from, d) if cfg.train.head_init_from else CorrectnessHead(d)
        self.last_rollout = None  # (spliced inputs, rewards) of the latest GRPO step, for the joint head
        self.augment = cfg.augment
        self.delims = delimiter_ids(self.tok, self.augment.delimiters)

    def encode(self, problem):
        return self.tok.encode(problem.prompt), self.tok.encode(problem.solution) + [self.tok.eos_id]

    def teacher_insertions(self, answer: list[int]) -> list[int]:
        """Where a fixed trigger inserts in a known answer (SFT): its decisions at the delimiters, at most M."""
        trigger = self.trigger if isinstance(self.trigger, FixedTrigger) else FixedTrigger("always")
        points = [i for i, t in enumerate(answer[:-1]) if t in self.delims]
        chosen = [p for j, p in enumerate(points) if trigger.decide(None, 0, j)[0]]
        return chosen[:self.augment.max_insertions]

    def rollouts(self, problems, group: int, sample: bool, grad: bool = False) -> Completions:
        """Decode G answers per problem (consecutive), scored by exact match. grad=True keeps the learned
        trigger's decision log-probs differentiable (reasoner and weaver are frozen then, so nothing
        else builds a graph)."""
        repeated = [p for p in problems for _ in range(group)]
        with torch.set_grad_enabled(grad):
            return score_completions(self.reasoner, self.weaver, self.tok, repeated, self.augment, self.trigger,
                                     self.delims, self.cfg.train.max_new_tokens, self.cfg.data.answer_pattern,
                                     sample=sample, temperature=self.cfg.train.temperature)


def sft_loss(system: System, problems) -> torch.Tensor:
    """Mean CE of the reference solutions with latents inserted (gradients reach the weaver only; for
    the controls, the LoRA of the copy that decodes)."""
    examples = []
    for problem in problems:
        prompt, answer = system.encode(problem)
        examples.append(splice(system.reasoner, system.weaver, prompt, answer, system.teacher_insertions(answer),
                               system.augment))
    embeds, labels, mask = batch_splices(examples)
    logp = token_log_probs(decoding(system.reasoner, system.weaver)[0], embeds, labels, mask)
    n = (shift_labels(labels) != IGNORE_INDEX).sum()
    return -logp.sum() / n


def grpo_step_loss(system: System, problems, stats: dict) -> torch.Tensor:
    """Sample G answers per problem, exact-match rewards, group advantages, clipped loss on the
    teacher-forced log-probs of the sampled tokens (with the rollout's insertion points)."""
    t = system.cfg.train
    done = system.rollouts(problems, t.group_size, sample=True)
    rewards = torch.tensor([float(c) for c in done.correct])
    adv = group_advantages(rewards, t.group_size)
    gen = done.generation
    embeds, labels, mask = splice_completions(system.reasoner, system.weaver, done.prompts, gen.tokens,
                                              gen.insertions, system.augment)
    logp = token_log_probs(system.reasoner, embeds, labels, mask)
    token_mask = shift_labels(labels) != IGNORE_INDEX  # the positions that predict a sampled token
    logp_ref = None
    if system.reference is not None:
        with torch.no_grad():
            ref = splice_completions(system.reasoner, system.reference, done.prompts, gen.tokens, gen.insertions,
                                     system.augment)
            logp_ref = token_log_probs(system.reasoner, *ref)
    stats["reward"] = rewards.mean().item()
    # the signal GRPO has: a group whose answers are all right or all wrong has zero advantages
    stats["mixed_groups"] = mixed_groups(rewards, t.group_size)
    if logp_ref is not None:  # k3 estimate of KL(policy || start), per completion token
        diff = (logp_ref - logp.detach())[token_mask]
        stats["kl"] = (torch.exp(diff) - diff - 1).mean().item()
    system.last_rollout = ((embeds.detach(), labels, mask), rewards)
    return grpo_loss(logp, logp.detach(), adv, token_mask, t.clip_eps, t.kl_beta, logp_ref)


def head_step(system: System, optimizer, stats: dict) -> None:
    """Joint training: one BCE step of the correctness head on the latest GRPO rollouts (latents
    inserted as at inference; no gradient reaches the reasoner or the weaver). Gradients are averaged
    over ranks."""
    inputs, rewards = system.last_rollout
    hidden, token_stats = head_inputs(system.reasoner, *inputs)
    logits = system.head(hidden, token_stats)
    loss = F.binary_cross_entropy_with_logits(logits, rewards.float())
    loss.backward()
    world = dist.get_world_size()
    for p in system.head.parameters():
        if p.grad is not None and world > 1:
            dist.all_reduce(p.grad)
            p.grad /= world
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    stats["head_loss"] = loss.item()
    stats["head_auroc"] = auroc(torch.sigmoid(logits.detach()), rewards.bool())


def trigger_step_loss(system: System, problems, stats: dict) -> torch.Tensor:
    """REINFORCE with group baselines for the learned trigger: reward = exact match - cost x insertions."""
    t = system.cfg.train
    done = system.rollouts(problems, t.group_size, sample=False, grad=True)
    gen = done.generation
    rewards = torch.tensor([float(correct) - system.cfg.trigger.insertion_cost * len(inserted)
                            for correct, inserted in zip(done.correct, gen.insertions)])
    adv = group_advantages(rewards, t.group_size, scale=False)  # the cost stays small next to a correct answer
    terms = [adv[i] * torch.stack(lp).sum() for i, lp in enumerate(gen.trigger_log_probs) if lp]
    stats["reward"] = rewards.mean().item()
    stats["insertions"] = sum(len(i) for i in gen.insertions) / len(gen.insertions)
    if not terms:  # no delimiter was met: a zero loss that still reaches the trigger's parameters
        return sum(p.sum() for p in system.trigger.parameters()) * 0.0
    return -torch.stack(terms).mean()


def evaluate(system: System, problems, batch: int = 16) -> float:
    """Greedy exact-match accuracy with the system's augmentation and trigger."""
    correct = 0
    for i in range(0, len(problems), batch):
        correct += sum(system.rollouts(problems[i:i + batch], 1, sample=False).correct)
    return correct / max(len(problems), 1)


def save_checkpoint(system, optimizer, out: Path, step: int, keep_last: int, head_optimizer=None) -> Path:
    """Collective. Rank 0 writes the trainable modules and optimizer state (identical on every rank:
    ZeRO-0 data parallelism); the commit (RNG per rank, manifest, trainer state, `latest`) is
    `runtime.checkpoint.save`'s, as for pretraining."""

    def write(ckpt: Path):
        if dist.get_rank() != 0:
            return
        system.weaver.save(ckpt)
        if isinstance(system.trigger, torch.nn.Module):
            save_file({k: v.contiguous() for k, v in system.trigger.state_dict().items()}, ckpt / "trigger.safetensors")
        if system.head is not None:
            system.head.save(ckpt / "head")
        torch.save({"optimizer": optimizer.state_dict(),
                    "head_optimizer": head_optimizer.state_dict() if head_optimizer else None}, ckpt / "optimizer.pt")

    return checkpoint.save(out, f"step_{step}", step, {"reasoner": system.cfg.reasoner.path,
                                                       "world_size": dist.get_world_size()}, keep_last, write)


class PostTrainer(TrainLoop):
    """Weaver SFT / GRPO (+ joint head) or trigger training on runtime.trainer.TrainLoop's schedule
    (save every N steps and at the end, preemption). Data parallel over the ranks of
    `deepspeed launch/posttrain.sh` (ZeRO-0: the trainable modules are small), or one process."""

    def __init__(self, cfg: PostConfig):
        import deepspeed

        self.rank, self.world = init_distributed()
        torch.manual_seed(cfg.train.seed)  # identical initial weaver on every rank
        self.cfg, self.system = cfg, System(cfg)
        t, system = cfg.train, self.system
        self.out, self.max_steps, self.save_every = Path(t.output_dir), t.max_steps, t.save_every
        module = system.trigger if t.mode == "trigger" else system.weaver
        if t.mode == "trigger":
            system.weaver.requires_grad_(False)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        self.head_optimizer = (torch.optim.AdamW(system.head.parameters(), lr=t.head_lr)
                               if system.head is not None else None)
        self.problems = load_problems(cfg.data.train, cfg.data.max_train, "train", t.seed)
        self.state = LoopState()
        ckpt = checkpoint.resolve_resume(t.resume, self.out)
        if ckpt is not None:
            self.resume(ckpt, optimizer)
        torch.manual_seed(t.seed + 7919 * (self.rank + 1))  # rollouts differ across ranks
        if ckpt is not None and (ckpt / f"rng_rank{self.rank}.pt").exists():
            checkpoint.set_rng_state(torch.load(ckpt / f"rng_rank{self.rank}.pt", weights_only=False))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config={
            "train_batch_size": t.batch_size * self.world, "train_micro_batch_size_per_gpu": t.batch_size,
            "gradient_accumulation_steps": 1, "gradient_clipping": t.grad_clip, "zero_optimization": {"stage": 0},
            "steps_per_print": 10**9})
        self.log_file = None
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            print(f"posttrain {t.mode}: world {self.world}, {sum(p.numel() for p in params):,} trainable parameters"
                  + (f", resumed from {ckpt} (step {self.state.step})" if ckpt else ""), flush=True)
            self.log_file = open(self.out / "metrics.jsonl", "a")
        self.order = torch.randperm(len(self.problems), generator=torch.Generator().manual_seed(t.seed)).tolist()

    def resume(self, ckpt: Path, optimizer) -> None:
        """The trainable modules, optimizer states and step of a verified checkpoint of this reasoner."""
        system = self.system
        checkpoint.verify(ckpt)
        state = checkpoint.read_state(ckpt)
        if state["reasoner"] != self.cfg.reasoner.path:
            raise ReasonerError(f"checkpoint {ckpt} was trained with reasoner {state['reasoner']}, not "
                                f"{self.cfg.reasoner.path}; point reasoner.path at it or start a new output_dir")
        system.weaver.load(ckpt)
        if (ckpt / "trigger.safetensors").exists() and isinstance(system.trigger, torch.nn.Module):
            system.trigger.load_state_dict(load_file(ckpt / "trigger.safetensors"))
        saved = torch.load(ckpt / "optimizer.pt", weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        if system.head is not None:
            system.head.load_state_dict(load_head(ckpt / "head").state_dict())
            self.head_optimizer.load_state_dict(saved["head_optimizer"])
        self.state.step = state["step"]

    def train_step(self) -> dict:
        """One optimizer step on this rank's share of the next problems; the record averaged over ranks."""
        t, system, step = self.cfg.train, self.system, self.state.step
        start = (step * self.world + self.rank) * t.batch_size
        batch = [self.problems[self.order[(start + i) % len(self.order)]] for i in range(t.batch_size)]
        stats = {}
        if t.mode == "sft":
            loss = sft_loss(system, batch)
        elif t.mode == "grpo":
            loss = grpo_step_loss(system, batch, stats)
        else:
            loss = trigger_step_loss(system, batch, stats)
        self.engine.backward(loss)
        self.engine.step()
        if system.head is not None:
            head_step(system, self.head_optimizer, stats)
        self.state.step += 1
        reduced = torch.tensor([loss.item(), *stats.values()], dtype=torch.float64)
        dist.all_reduce(reduced)
        return {"step": self.state.step, **dict(zip(["loss", *stats], (reduced / self.world).tolist()))}

    def log(self, record: dict, seconds: float) -> None:
        if self.log_file is None:
            return
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()
        if record["step"] % self.cfg.train.log_every == 0 or record["step"] == 1:
            print(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
                  flush=True)

    def save(self) -> None:
        save_checkpoint(self.system, self.optimizer, self.out, self.state.step, self.cfg.train.keep_last,
                        self.head_optimizer)

    def finish(self) -> None:
        if self.log_file is not None:
            self.log_file.close()

    def stop(self, message: str) -> None:
        super().stop(message)
        self.finish()


def run(cfg: PostConfig) -> System:
    """Train as configured; returns the trained system (for tests and experiments)."""
    init_distributed()
    with lock.held(cfg.train.output_dir):  # the output folder is this job's alone while it runs
        trainer = PostTrainer(cfg)
        trainer.train()
    return trainer.system


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    with rank_errors((ConfigError, ProblemError, ReasonerError)):
        run(load_config(args.config, args.overrides))
        shutdown_distributed(exit_process=True)


if __name__ == "__main__":
    main()
