"""Post-training run config (YAML + `section.key=value` overrides, as for pretraining).

`posttrain.train` reads it whole; `posttrain.evaluate` and `posttrain.head` read the same file
(`--config FILE section.key=value ...`) with their flags as further overrides (`ConfigArguments`).
"""

import argparse
import json
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path

from runtime import config as _config
from runtime.config import ConfigError, LaunchConfig

from .augment import AugmentConfig
from .data import ANSWER_PATTERN
from .ltpo import LTPOConfig
from .weaver import WeaverConfig


@dataclass
class ReasonerSection:
    path: str = ""  # a Hugging Face causal LM folder (LoopLM export, SmolLM3, Llama, ...)
    tokenizer: str | None = None  # default: tokenizer.model or the tokenizer files in `path`


@dataclass
class TriggerSection:
    policy: str = "always"  # always, never, every:K, learned
    insertion_cost: float = 0.05  # reward cost per insertion when the trigger is trained
    init_from: str | None = None


@dataclass
class DataSection:
    train: str = "synthetic:mano"  # GSM8K-format jsonl or synthetic:mano / synthetic:multihop
    eval: str | None = None
    max_train: int | None = None
    max_eval: int | None = None  # None: all of data.eval
    answer_pattern: str = ANSWER_PATTERN


@dataclass
class TrainSection:
    mode: str = "sft"  # sft (weaver), grpo (weaver), trigger (learned trigger, weaver frozen)
    output_dir: str = "runs/posttrain"
    max_steps: int = 100
    batch_size: int = 8  # problems per step
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 1234
    save_every: int = 50
    keep_last: int = 2
    resume: str = "auto"
    log_every: int = 10
    group_size: int = 4  # GRPO: sampled answers per problem
    max_new_tokens: int = 32
    temperature: float = 1.0
    clip_eps: float = 0.2
    kl_beta: float = 0.0
    joint_head: bool = False  # GRPO: also train a correctness head on the rollouts' exact-match labels
    head_lr: float = 1e-3
    head_init_from: str | None = None


@dataclass
class EvalSection:
    """`python -m posttrain.evaluate` (its problems: data.eval, at most data.max_eval; the weaver:
    weaver.init_from; a learned trigger: trigger.init_from)."""
    batch: int = 8
    max_new_tokens: int = 256
    ltpo: LTPOConfig = field(default_factory=LTPOConfig)  # its stop_at is for the confidence rows
    stop_at: float = 0.95  # Correctness-LTPO stops a problem once the head's P(correct) reaches this
    draft_tokens: int | None = None  # Correctness-LTPO's draft; None: the head's own (head.json), else all


@dataclass
class HeadSection:
    """`python -m posttrain.head` (its problems: data.train; the weaver: weaver.init_from)."""
    problems: int = 400
    samples: int = 2  # completions per problem: 1 greedy + sampled
    max_new_tokens: int = 64
    steps: int = 1000  # BCE steps; the weights with the best validation AUROC (every 50 steps) are kept
    # completion tokens the head reads (None: all, 0: prompt + latents only); 8, measured: the accuracy
    # of a whole-answer draft at 0.38x its cost (README)
    draft_tokens: int | None = 8


@dataclass
class PostConfig:
    reasoner: ReasonerSection = field(default_factory=ReasonerSection)
    weaver: WeaverConfig = field(default_factory=WeaverConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    trigger: TriggerSection = field(default_factory=TriggerSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    head: HeadSection = field(default_factory=HeadSection)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def validate(self):
        if not self.reasoner.path:
            raise ConfigError("config key reasoner.path is required: the folder of the reasoner model")
        if self.train.mode not in ("sft", "grpo", "trigger"):
            raise ConfigError(f"config key train.mode: {self.train.mode!r}; use sft, grpo or trigger")
        if self.train.mode == "trigger" and self.trigger.policy != "learned":
            raise ConfigError("config key trigger.policy must be 'learned' when train.mode is trigger")
        if self.train.mode == "grpo" and self.train.group_size < 2:
            raise ConfigError("config key train.group_size must be at least 2 for GRPO")
        if self.train.joint_head and self.train.mode != "grpo":
            raise ConfigError("config key train.joint_head trains the head on GRPO rollouts: set train.mode=grpo")
        if self.weaver.num_latents < 1 or self.augment.max_insertions < 0:
            raise ConfigError("config keys weaver.num_latents (>= 1) and augment.max_insertions (>= 0)")
        if self.weaver.latents not in ("woven", "pause", "none"):
            raise ConfigError(f"config key weaver.latents: {self.weaver.latents!r}; use woven (the weaver), or for "
                              "the LoRA SFT controls pause (pause tokens in place of the latents) or none")
        if self.weaver.latents != "woven" and self.train.mode != "sft":
            raise ConfigError(f"config key weaver.latents={self.weaver.latents} (a LoRA SFT control) trains with "
                              "train.mode=sft only; GRPO and the trigger build on a woven weaver")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> PostConfig:
    """A post-training config from YAML + `section.key=value` overrides, validated."""
    return _config.load_config(path, overrides, PostConfig)


def config_value(cfg, key: str):
    """The value of dotted config key `key` (e.g. "eval.ltpo.steps")."""
    return reduce(getattr, key.split("."), cfg)


class ConfigArguments:
    """The config part of a post-training command line: `--config FILE` and `section.key=value`
    overrides, as `posttrain.train` takes them, plus flags that each set one config key (`add`).
    `parse` gives the config: the YAML (or the defaults), then the overrides, then the flags given."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser, self.keys = parser, {}  # argparse dest -> config key
        parser.add_argument("--config", default=None, help="a post-training YAML config (configs/posttrain_*.yaml)")
        parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                            help="config overrides, as for posttrain.train (the flags override them)")

    def add(self, flag: str, key: str, help: str = "", **kwargs) -> None:
        """A flag setting config key `key`; left out, the key keeps the config's value (shown in the help)."""
        default = config_value(PostConfig(), key)
        note = f"[{key}; default {default!r}]".replace("%", "%%")
        action = self.parser.add_argument(flag, default=argparse.SUPPRESS, help=f"{help} {note}".lstrip(), **kwargs)
        self.keys[action.dest] = key

    def add_models(self, weaver_help: str) -> None:
        """--reasoner, --tokenizer and --weaver, which every post-training command takes."""
        self.add("--reasoner", "reasoner.path")
        self.add("--tokenizer", "reasoner.tokenizer")
        self.add("--weaver", "weaver.init_from", help=weaver_help)

    def parse(self, argv=None) -> tuple[argparse.Namespace, PostConfig]:
        """Parse the command line; the flags set in `args` hold their config values then."""
        args = self.parser.parse_intermixed_args(argv)
        given = [f"{key}={json.dumps(getattr(args, dest))}" for dest, key in self.keys.items() if hasattr(args, dest)]
        cfg = load_config(args.config, [*args.overrides, *given])  # JSON is YAML: the values keep their types
        for dest, key in self.keys.items():
            setattr(args, dest, config_value(cfg, key))
        return args, cfg
