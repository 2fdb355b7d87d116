"""Post-training run config (YAML + `section.key=value` overrides, as for pretraining)."""

from dataclasses import dataclass, field
from pathlib import Path

from runtime import config as _config
from runtime.config import ConfigError, LaunchConfig


@dataclass
class ReasonerSection:
    path: str = ""  # a Hugging Face causal LM folder (LoopLM export, SmolLM3, Llama, ...)
    tokenizer: str | None = None  # default: tokenizer.model or the tokenizer files in `path`


@dataclass
class WeaverSection:
    num_latents: int = 8
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    init_from: str | None = None  # a saved weaver folder to start from


@dataclass
class AugmentSection:
    prompt_augment: bool = True
    max_insertions: int = 5
    delimiters: list = field(default_factory=lambda: [",", ".", "\n"])


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
    max_eval: int = 200
    answer_pattern: str = r"####\s*([^\n]+)"


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
class PostConfig:
    reasoner: ReasonerSection = field(default_factory=ReasonerSection)
    weaver: WeaverSection = field(default_factory=WeaverSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    trigger: TriggerSection = field(default_factory=TriggerSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
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


def load_config(path: str | Path | None, overrides: list[str] = ()) -> PostConfig:
    """A post-training config from YAML + `section.key=value` overrides, validated."""
    return _config.load_config(path, overrides, PostConfig)
