"""The training-loop skeleton both trainers fill in (torchtitan's split: state, `train_step`, `log`,
`save`, `evaluate`), so that the schedule (save every N steps and at the end, stop at a step,
preemption, periodic evaluation) is written once.

A subclass sets `state` (with `.step`), `rank`, `max_steps`, `save_every` and optionally
`exit_at_step` / `eval_every`, and implements `train_step`, `log` and `save`.
"""

import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


class Preemption:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the end of the step and exits."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done


class TrainLoop:
    exit_at_step: int | None = None  # save and stop here (the schedule still runs to max_steps)
    eval_every: int = 0  # 0: evaluate only at the end

    def train_step(self):
        """One optimizer step (advances `state.step`); returns what `log` reports, or None when the
        data is exhausted."""
        raise NotImplementedError

    def log(self, stats, seconds: float) -> None:
        raise NotImplementedError

    def save(self) -> None:
        """Collective: a complete checkpoint of the current step."""
        raise NotImplementedError

    def evaluate(self) -> None:
        pass

    def finish(self) -> None:
        """After the last step (not after a stop): the final evaluation and reports."""

    def stop(self, message: str) -> None:
        """The run ends early (preemption, exit_at_step); a checkpoint was just saved."""
        if self.rank == 0:
            print(message, flush=True)

    def preempted(self, stats) -> bool:
        """Whether any rank was asked to stop (every rank must agree: one all-reduce)."""
        flag = torch.tensor([float(self.preemption.requested)])
        dist.all_reduce(flag)
        return bool(flag.item() > 0)

    def train(self) -> bool:
        """Run the schedule to max_steps; False when it stopped early (preempted or exit_at_step)."""
        self.preemption = Preemption()
        while self.state.step < self.max_steps:
            start = time.perf_counter()
            stats = self.train_step()
            if stats is None:
                break
            self.log(stats, time.perf_counter() - start)
            step, preempted = self.state.step, self.preempted(stats)
            if preempted or step % self.save_every == 0 or step in (self.max_steps, self.exit_at_step):
                self.save()
            if preempted:
                self.stop(f"preempted: saved checkpoint at step {step}; resume with train.resume=auto")
                return False
            if step == self.exit_at_step:
                self.stop(f"stopping at train.exit_at_step={step} (checkpoint saved)")
                return False
            if self.eval_every and step % self.eval_every == 0 and step != self.max_steps:
                self.evaluate()
        self.finish()
        return True
