"""The model, optimizer, schedule and DeepSpeed engine of a run."""

import math

import torch

from looplm import LoopLMConfig, LoopLMForCausalLM, compile_layers, preset_config

from .config import RunConfig, deepspeed_config


def model_config(cfg: RunConfig) -> LoopLMConfig:
    """The LoopLM config of a run: a preset (or init_from's config) with model.overrides applied."""
    if cfg.model.init_from:
        return LoopLMConfig.from_pretrained(cfg.model.init_from, **cfg.model.overrides)
    return preset_config(cfg.model.preset, **cfg.model.overrides)


def build_model(cfg: RunConfig) -> LoopLMForCausalLM:
    """Random init from a preset + overrides, or the weights of a Hugging Face/Ouro folder."""
    if cfg.model.init_from:
        model = LoopLMForCausalLM.from_pretrained(cfg.model.init_from, config=model_config(cfg))
    else:
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = LoopLMForCausalLM(model_config(cfg))
    if cfg.train.activation_checkpointing:  # one checkpoint per (pass, layer) application
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.train.tiled_mlp > 1:
        from .parallel import tile_mlps

        tile_mlps(model, cfg.train.tiled_mlp)
    if cfg.train.compile:
        compile_layers(model)
    if cfg.ouro.objective == "stage2":  # stage II: the LM is frozen, only the exit gate trains
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("model.early_exit_gate."))
    return model


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases and the exit gate."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "early_exit_gate" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # stage II has no decayed parameters


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next step can be vetoed (a NaN or spiking loss): parameters and moments stay as
    they were. DeepSpeed calls this `step()` after its gradient reduction and clipping."""

    skip_next_step = False

    def step(self, closure=None):
        if self.skip_next_step:
            return None
        return super().step(closure)


def lr_factor(step: int, cfg: RunConfig) -> float:
    """LR multiplier after `step` optimizer steps: linear warmup, then constant / warmup-stable-decay
    (linear to min_lr_ratio over the last decay_fraction of max_steps) / cosine to min_lr_ratio."""
    o, total = cfg.optim, cfg.train.max_steps
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    if o.schedule == "wsd":
        decay_start = total - int(o.decay_fraction * total)
        if step < decay_start:
            return 1.0
        frac = (step - decay_start) / max(total - decay_start, 1)
        return 1.0 - (1.0 - o.min_lr_ratio) * min(frac, 1.0)
    frac = min((step - o.warmup_steps) / max(total - o.warmup_steps, 1), 1.0)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


def entropy_beta(step: int, cfg: RunConfig, default: float) -> float:
    """beta in force at `step` from ouro.beta_schedule ([[from_step, beta], ...])."""
    beta = default
    for start, value in sorted(cfg.ouro.beta_schedule):
        if step >= start:
            beta = float(value)
    return beta


def build_engine(cfg: RunConfig, model, world_size: int, load_universal: bool = False, mpu=None):
    """mpu: DeepSpeed's sequence-parallel groups (pretrain/parallel.py) when train.sequence_parallel > 1."""
    import deepspeed

    optimizer = SkippableAdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                               betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world_size, load_universal), mpu=mpu)
    return engine, optimizer, scheduler
