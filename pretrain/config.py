"""Run configuration: YAML files + dotted command-line overrides, validated at start.

A run config has the sections below; every key has a type and a default, unknown keys and wrong
types fail with an error naming the dotted key. The DeepSpeed config is derived from it (`deepspeed_config`),
with an optional `deepspeed:` block of extra standard DeepSpeed keys that must not restate derived ones.

    python -m pretrain.train --config configs/smoke.yaml train.max_steps=10 optim.lr=1e-3
"""

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from looplm.config import OBJECTIVES
from runtime import config as _config
from runtime.config import ConfigError, LaunchConfig


@dataclass
class ModelConfig:
    preset: str = "tiny"  # looplm preset (tiny, ouro-1.4b, ouro-2.6b) the overrides apply to
    init_from: str | None = None  # a Hugging Face/Ouro folder to start from instead of random weights
    overrides: dict = field(default_factory=dict)  # any LoopLMConfig key (total_ut_steps, vocab_size, ...)


@dataclass
class DataConfig:
    blend: typing.Any = None  # "w1 prefix1 w2 prefix2" or [{weight, path}]; None = the embedded default corpus
    default_corpus_dir: str = "data/default"  # where the embedded corpus is generated when blend is None
    tokenizer: str | None = None  # tokenizer of the indexed files (checked against their header)
    seq_len: int = 4096
    valid_fraction: float = 0.01  # documents of the blend held out for validation (0 with valid_blend)
    valid_blend: typing.Any = None  # separate validation data (blend syntax), e.g. a prepared corpus's valid split
    seed: int = 1234
    on_exhaust: str = "wrap"  # wrap (reshuffled epochs) or stop
    num_workers: int = 0
    eval_tasks_dir: str | None = None  # eval_<task>.jsonl files for exact-match accuracy per depth
    verify: str | bool = "sample"  # checksums of the .bin blocks at start: full | sample | off (YAML reads off as false)
    verify_blocks: int = 16  # sample: blocks checked per file (the first, the last, the rest at random): 1 GiB
    verify_on_read: bool = False  # also check every block the first time training reads from it


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final LR / peak LR at the end of the decay
    weight_decay: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    schedule: str = "wsd"  # wsd (warmup-stable-decay), cosine, constant
    warmup_steps: int = 1000
    decay_fraction: float = 0.2  # wsd: the last fraction of max_steps decays to min_lr


@dataclass
class OuroConfig:
    objective: str = "stage1"  # stage1 (LM + gate), last_pass (plain CE of the last pass) or stage2 (gate only)
    beta_schedule: list = field(default_factory=list)  # [[from_step, beta], ...]; empty = model's entropy_beta


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    max_steps: int = 1000
    global_batch: int = 8  # sequences per optimizer step over all ranks
    micro_batch: int = 1  # sequences per rank per forward
    zero_stage: int = 2
    bf16: bool = True
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each shared layer once (regional compilation; README: when it pays)
    sequence_parallel: int = 1  # split every sequence over this many ranks (DeepSpeed Ulysses; README: Parallelism)
    tensor_parallel: int = 1  # shard the shared layers' projections over this many ranks (DeepSpeed AutoTP, ZeRO 0-2)
    tiled_mlp: int = 1  # run each MLP over this many slices of the sequence (DeepSpeed TiledMLP; long contexts)
    seed: int = 1234
    save_every: int = 1000
    keep_last: int = 3
    resume: str = "auto"  # auto (latest complete checkpoint in output_dir), none, or a checkpoint folder
    exit_at_step: int | None = None  # save and stop here (the schedule still runs to max_steps)
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 8
    eval_max_prompts: int = 200
    spike_factor: float = 3.0  # a loss above factor x the recent mean is a spike (skipped); 0 disables
    spike_window: int = 20
    max_bad_steps: int = 5  # abort after this many consecutive skipped steps


@dataclass
class LoggingConfig:
    wandb: bool = False
    wandb_project: str = "looplm"
    wandb_mode: str = "offline"  # offline never needs a network; online syncs
    run_name: str | None = None
    peak_tflops: float = 989.0  # per device, dense bf16 (H100 SXM); used for MFU


@dataclass
class FaultConfig:
    """Fault injection, to test the guards: a NaN loss at these steps, SIGKILL at a step, an error on one rank."""

    nan_at_steps: list = field(default_factory=list)
    kill_at_step: int | None = None
    fail_at_step: int | None = None  # raise an error at this step ...
    fail_rank: int = 0  # ... on this rank only (a failure its peers must not hide)
    kill_in_save_at_step: int | None = None  # SIGKILL rank 0 inside this step's save, shards written, not committed


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ouro: OuroConfig = field(default_factory=OuroConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    deepspeed: dict = field(default_factory=dict)  # extra standard DeepSpeed config keys

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        validate(self)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """A pretraining config from YAML + `section.key=value` overrides, validated."""
    return _config.load_config(path, overrides, RunConfig)


def config_from_dict(tree: dict) -> RunConfig:
    """A pretraining config from an already-parsed mapping (e.g. the one a checkpoint stored)."""
    return _config.config_from_dict(tree, RunConfig)


def validate(cfg: RunConfig, world_size: int | None = None) -> None:
    """Cross-key checks; with world_size, also the batch arithmetic."""
    from looplm.config import LoopLMConfig, preset_config

    t, o = cfg.train, cfg.optim
    if cfg.data.verify is False:  # `verify: off` in YAML 1.1
        cfg.data.verify = "off"
    checks = [
        (t.zero_stage in (0, 1, 2, 3), "train.zero_stage", f"{t.zero_stage} is not a ZeRO stage; use 0, 1, 2 or 3"),
        (t.max_steps > 0, "train.max_steps", "must be positive"),
        (t.micro_batch > 0 and t.global_batch > 0, "train.global_batch", "batch sizes must be positive"),
        (t.sequence_parallel >= 1, "train.sequence_parallel", "must be 1 (off) or more ranks per sequence"),
        (t.tensor_parallel >= 1, "train.tensor_parallel", "must be 1 (off) or more ranks per layer"),
        (t.tiled_mlp >= 1, "train.tiled_mlp", "must be 1 (off) or more slices of the sequence"),
        (t.tensor_parallel == 1 or t.zero_stage <= 2, "train.tensor_parallel",
         f"AutoTP trains with ZeRO 0-2, not train.zero_stage={t.zero_stage}; lower the stage"),
        (t.tensor_parallel == 1 or t.sequence_parallel == 1, "train.tensor_parallel",
         "sequence and tensor parallelism are not combined yet; set one of them to 1"),
        (cfg.data.seq_len % max(t.sequence_parallel, 1) == 0, "train.sequence_parallel",
         f"data.seq_len {cfg.data.seq_len} must be divisible by train.sequence_parallel={t.sequence_parallel}"),
        (t.save_every > 0 and t.keep_last > 0, "train.save_every", "save_every and keep_last must be positive"),
        (o.schedule in ("wsd", "cosine", "constant"), "optim.schedule", f"{o.schedule!r}: use wsd, cosine or constant"),
        (0 <= o.decay_fraction <= 1, "optim.decay_fraction", "must be in [0, 1]"),
        (cfg.ouro.objective in OBJECTIVES, "ouro.objective", f"{cfg.ouro.objective!r}: use one of {OBJECTIVES}"),
        (cfg.data.valid_blend is None or cfg.data.valid_fraction == 0, "data.valid_fraction",
         f"{cfg.data.valid_fraction} holds training documents out while data.valid_blend names the validation data; "
         "set data.valid_fraction: 0"),
        (cfg.data.valid_blend is None or cfg.data.blend is not None, "data.valid_blend",
         "needs data.blend (the embedded corpus has its own validation split)"),
        (cfg.data.on_exhaust in ("wrap", "stop"), "data.on_exhaust", f"{cfg.data.on_exhaust!r}: use wrap or stop"),
        (cfg.data.verify in ("full", "sample", "off"), "data.verify", f"{cfg.data.verify!r}: use full, sample or off"),
        (cfg.data.verify_blocks >= 2, "data.verify_blocks", "must be at least 2 (the first and the last block)"),
        (cfg.logging.wandb_mode in ("offline", "online", "disabled"), "logging.wandb_mode", "use offline, online or disabled"),
        (len(o.betas) == 2, "optim.betas", "needs two values [beta1, beta2]"),
        (t.resume in ("auto", "none") or Path(t.resume).exists(), "train.resume",
         f"{t.resume!r}: use auto, none or an existing checkpoint folder"),
    ]
    for ok, key, problem in checks:
        if not ok:
            raise ConfigError(f"config key {key}: {problem}")
    for entry in cfg.ouro.beta_schedule:
        if not (isinstance(entry, list) and len(entry) == 2):
            raise ConfigError(f"config key ouro.beta_schedule: entries are [from_step, beta], got {entry!r}")
    known = set(LoopLMConfig.__init__.__code__.co_varnames) | {"bos_token_id", "eos_token_id", "pad_token_id"}
    for key in cfg.model.overrides:
        if key not in known:
            raise ConfigError(f"unknown config key model.overrides.{key}; it must be a LoopLMConfig key")
    if cfg.model.init_from is None:
        try:
            model = preset_config(cfg.model.preset, **cfg.model.overrides)
        except ValueError as err:
            raise ConfigError(f"config key model: {err}") from err
        if cfg.data.seq_len > model.max_position_embeddings:
            raise ConfigError(f"config key data.seq_len: {cfg.data.seq_len} is longer than the model's "
                              f"max_position_embeddings ({model.max_position_embeddings}); lower data.seq_len or "
                              "raise model.overrides.max_position_embeddings")
        check_head_split(model, t.sequence_parallel, "train.sequence_parallel")
        check_head_split(model, t.tensor_parallel, "train.tensor_parallel")
    derived = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "gradient_clipping", "bf16", "optimizer", "scheduler"}
    clash = derived & set(cfg.deepspeed)
    if clash:
        raise ConfigError(f"config key deepspeed.{sorted(clash)[0]} restates a derived setting; set it through "
                          "train.* / optim.* instead")
    for key, size in (("train.sequence_parallel", t.sequence_parallel), ("train.tensor_parallel", t.tensor_parallel)):
        if world_size is not None and world_size % size:
            raise ConfigError(f"config key {key}={size}: the {world_size} ranks do not split into groups of that "
                              "size; use a divisor of the number of ranks")
    data_parallel = None if world_size is None else world_size // (t.sequence_parallel * t.tensor_parallel)
    if data_parallel is not None and t.global_batch % (t.micro_batch * data_parallel):
        raise ConfigError(f"config keys train.global_batch={t.global_batch}, train.micro_batch={t.micro_batch}: the global "
                          f"batch must be micro_batch x gradient accumulation x data-parallel size ({data_parallel}); "
                          f"choose a global_batch that is a multiple of {t.micro_batch * data_parallel}")


def check_head_split(model, size: int, key: str) -> None:
    """Ulysses and AutoTP split the attention heads over their ranks: both head counts must divide
    (and AutoTP the MLP width)."""
    names = ("num_attention_heads", "num_key_value_heads") + (("intermediate_size",) if "tensor" in key else ())
    for name in names:
        if getattr(model, name) % size:
            raise ConfigError(f"config key {key}={size}: the model's {name} ({getattr(model, name)}) is not "
                              "divisible by it; use a divisor")


def deepspeed_config(cfg: RunConfig, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed config, derived: nothing is stated twice."""
    t = cfg.train
    data_parallel = world_size // (t.sequence_parallel * t.tensor_parallel)
    ds = {
        # AutoTP counts every rank of a tensor-parallel group in DeepSpeed's batch (they see the same samples)
        "train_batch_size": t.global_batch * t.tensor_parallel,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.global_batch // (t.micro_batch * data_parallel),
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": t.bf16},
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW: runs on CPU and GPU alike
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    for key, value in cfg.deepspeed.items():
        if isinstance(value, dict) and isinstance(ds.get(key), dict):
            ds[key] = {**ds[key], **value}
        else:
            ds[key] = value
    if t.tensor_parallel > 1:
        ds["tensor_parallel"] = {"autotp_size": t.tensor_parallel}
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds
