"""LoopLM: N shared decoder layers run T times, an exit gate after every pass (Ouro layout and
state-dict names, spec/ouro_format.md).

Two execution modes of the pass loop:
* full (training, scoring, prefill): every token runs every pass, as the official code does; the
  exit policy only selects which pass's output a token emits.
* truncated (decoding one token per row after a cached prefix, or `exit_steps` given): a token that
  has exited stops. Multi-token chunks after a prefix (e.g. inserted latent vectors) run every pass.
  Its hidden state, gate and keys/values at deeper passes are copies of its exit pass ("copy-forward",
  see cache.py). With `exit_skip=True` batch rows whose tokens have all exited are not computed at
  all, and once every row has exited the remaining passes are not run; with `exit_skip=False` the
  same result is computed densely (every pass for every token, results of exited tokens discarded).
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .attention import build_attention_mask, position_ids_from_mask
from .cache import CacheSlot, LoopCache
from .compat import CACHE_NAME, cache_argument, output_cache
from .config import OBJECTIVES, LoopLMConfig
from .exits import ExitPolicy, exit_distribution, resolve_exit_policy, select_exit_steps
from .layers import DecoderLayer, RMSNorm, RotaryEmbedding
from .objectives import IGNORE_INDEX, fused_exit_ce, shift_labels, stage1_loss, stage2_gate_loss, token_cross_entropy
from .remote_code import write_remote_code


@dataclass
class LoopLMModelOutput(ModelOutput):
    hidden_states: tuple[torch.Tensor, ...] | None = None  # per pass, after the final norm, (B, S, d)
    gate_logits: torch.Tensor | None = None  # (B, S, T) fp32
    exit_steps: torch.Tensor | None = None  # (B, S) pass each token emits
    if CACHE_NAME == "cache":  # the field's name is the one the installed transformers uses (compat.py)
        cache: LoopCache | None = None
    else:
        past_key_values: LoopCache | None = None


@dataclass
class LoopLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, S, V) under the exit policy
    if CACHE_NAME == "cache":
        cache: LoopCache | None = None
    else:
        past_key_values: LoopCache | None = None
    step_losses: torch.Tensor | None = None  # (T,) mean CE per pass over the targets
    step_logits: tuple[torch.Tensor, ...] | None = None  # T x (B, S, V), only with output_step_logits
    exit_probs: torch.Tensor | None = None  # (B, S, T) exit pmf
    gate_probs: torch.Tensor | None = None  # (B, S, T) sigmoid gate values
    exit_steps: torch.Tensor | None = None  # (B, S) selected pass (0-indexed)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # per pass, only with output_hidden_states


class LoopLMPreTrainedModel(PreTrainedModel):
    config_class = LoopLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, nn.Embedding) and self.config.embedding_init_std is not None:
            init.normal_(module.weight, mean=0.0, std=self.config.embedding_init_std)


class LoopLMModel(LoopLMPreTrainedModel):
    def __init__(self, config: LoopLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.early_exit_gate = nn.Linear(config.hidden_size, 1)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        # Token-layer applications run so far (tokens x layers): what early exit saves, made countable.
        self.layer_token_applications = 0
        self.post_init()

    @property
    def kv_heads(self) -> int:
        """Key/value heads this module's attention computes: the config's, or this rank's share of
        them once tensor parallelism split the projections (DeepSpeed's AutoTP updates `num_kv_heads`)."""
        return self.layers[0].self_attn.num_kv_heads

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                cache: LoopCache | None = None, use_cache=False, num_steps=None,
                exit_policy: ExitPolicy = ExitPolicy(), exit_steps=None, exit_skip=True,
                past_key_values: LoopCache | None = None) -> LoopLMModelOutput:
        """Run the passes. num_steps: passes (default total_ut_steps; more = depth extrapolation).
        exit_steps: (B, S) forced exit pass per token (truncated mode). cache: a LoopCache
        (`past_key_values` is the same argument under the name transformers < 5.24 uses)."""
        cache = cache_argument(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, S, _ = h.shape
        T = num_steps or self.config.total_ut_steps
        if cache is None and use_cache:
            cache = LoopCache(self.config.num_hidden_layers, self.config.kv_sharing)
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = position_ids_from_mask(attention_mask)[:, past_len:]
            else:
                position_ids = torch.arange(past_len, past_len + S, device=h.device)[None]
        mask = build_attention_mask(S, past_len, attention_mask, position_ids)
        rope = self.rotary(position_ids, h.dtype)
        # Only single-token decode steps exit early: chunks (inserted latents, prompts) run every pass.
        truncate = exit_steps is not None or (past_len > 0 and S == 1 and exit_policy.is_online)
        skip = truncate and exit_skip
        # Copy-forward within a chunk needs the chunk's keys per pass: a scratch cache when none is kept.
        store = cache if cache is not None or not truncate else LoopCache(self.config.num_hidden_layers)
        if store is not None:
            store.reserve(T, B, S, self.kv_heads, self.config.head_dim, h.dtype, h.device)

        hiddens, gates = [], []
        exited = None  # (B, S) tokens whose exit pass is behind us
        for t in range(T):
            rows = None
            if skip and exited is not None:
                live = (~exited).any(-1)
                if not live.all():
                    rows = live.nonzero().squeeze(-1)
            if rows is not None and rows.numel() == 0:  # everyone has exited: copy-forward only
                hiddens.append(hiddens[-1])
                gates.append(gates[-1])
                continue
            # Exited tokens inside computed rows keep their exit-pass keys (none when each row is one live token).
            frozen = None if exited is None or (skip and S == 1) else (exited if rows is None else exited[rows])
            z = self._pass(h, t, rows, frozen, store, mask, rope)
            if exited is not None:
                z = torch.where(exited[..., None], h, z)
            h = z
            hiddens.append(h)
            gates.append(self.early_exit_gate(h).squeeze(-1).float())
            if truncate:
                steps_now = exit_steps if exit_steps is not None else select_exit_steps(
                    exit_policy, torch.stack(gates, -1), hiddens, T)
                exited = steps_now <= t

        gate_logits = torch.stack(gates, -1)
        steps = exit_steps if exit_steps is not None else select_exit_steps(exit_policy, gate_logits, hiddens, T)
        if store is not None:
            store.commit(steps if truncate else torch.full_like(steps, T - 1), truncate)
        return LoopLMModelOutput(hidden_states=tuple(hiddens), gate_logits=gate_logits, exit_steps=steps,
                                 **{CACHE_NAME: cache})

    def _pass(self, h, t, rows, frozen, cache, mask, rope):
        """One pass over the N layers for batch rows `rows` (None = all) -> the full-batch new state.
        With a cache, attention runs over every row's cached keys (read in place) and only the
        computed rows' results are kept; their new keys are written in place."""
        def take(x):
            return x if rows is None or x.shape[0] == 1 else x[rows]

        z, r_rope = take(h), tuple(take(x) for x in rope)
        for l, layer in enumerate(self.layers):
            slot = None if cache is None else CacheSlot(cache, t, l, rows, frozen)
            z = layer(z, rope=r_rope, mask=mask, cache=slot)
            self.layer_token_applications += z.shape[0] * z.shape[1]
        z = self.norm(z)
        return z if rows is None else h.index_copy(0, rows, z)


class LoopLMForCausalLM(LoopLMPreTrainedModel, GenerationMixin):
    def __init__(self, config: LoopLMConfig):
        super().__init__(config)
        self.model = LoopLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward creates its own LoopCache (one slot per pass and layer)

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        # Tools that read Ouro checkpoints dispatch on the official architecture name; the folder also
        # carries its own modeling file and `auto_map`, to load where looplm is not installed (remote_code.py).
        self.config.architectures = ["OuroForCausalLM"]
        if kwargs.get("is_main_process", True):
            write_remote_code(save_directory, self.config)
            self.config.save_pretrained(save_directory)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None,
                output_attentions=None, return_dict=None, logits_to_keep=0, output_step_logits=False,
                num_steps=None, exit_at_step=None, exit_threshold=None, exit_hidden_diff=None,
                use_weighted_exit=False, exit_steps=None, exit_skip=True, objective=None, entropy_beta=None,
                num_items_in_batch=None, compute_logits=None, cache_position=None, cache=None,
                targets=None) -> LoopLMOutput:
        """Forward with per-pass outputs.

        Exit policy (priority): exit_at_step > exit_hidden_diff > exit_threshold > use_weighted_exit >
        config (early_exit_step, early_exit_hidden_diff, early_exit_threshold). num_steps: passes to run.
        labels: (B, S) token ids, shifted inside, -100 ignored; or `targets`: labels already shifted (the
        token after each position), for a slice of a longer sequence (sequence parallelism). The loss is
        `objective` (config default):
        "stage1" = sum_t p_t CE_t - beta H(p) averaged over targets (or divided by num_items_in_batch),
        "last_pass" = plain CE of the last pass (what a non-looped model trains; the gate is not trained),
        "stage2" = the gate-only BCE objective (no gradient reaches the LM). entropy_beta: beta of stage I
        (config default); a trainer passes both each step rather than writing them into the config.
        compute_logits: default False when training with labels (the loss never needs them).
        cache: a LoopCache (`past_key_values` is the same argument under the name transformers < 5.24 uses).
        cache_position: ignored; early 5.x releases' generate() passes it, the cache knows its own length.
        """
        cache = cache_argument(cache, past_key_values)
        if output_attentions:
            raise ValueError("output_attentions is not supported by LoopLM (SDPA/FlashAttention never form them)")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if labels is not None:
            if targets is not None:
                raise ValueError("pass labels (shifted inside) or targets (already shifted), not both")
            targets = shift_labels(labels)
        use_cache = use_cache and targets is None
        policy = resolve_exit_policy(self.config, exit_at_step, exit_threshold, exit_hidden_diff, use_weighted_exit)
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         position_ids=position_ids, cache=cache, use_cache=use_cache,
                         num_steps=num_steps, exit_policy=policy, exit_steps=exit_steps, exit_skip=exit_skip)
        hiddens, gate_logits = out.hidden_states, out.gate_logits
        exit_probs = exit_distribution(gate_logits)

        loss = step_losses = None
        if targets is not None:
            beta = self.config.entropy_beta if entropy_beta is None else entropy_beta
            loss, step_losses = self._loss(hiddens, gate_logits, targets, objective or self.config.objective, beta,
                                           num_items_in_batch)

        logits = None
        if compute_logits if compute_logits is not None else (targets is None or not self.training):
            keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
            if policy.kind == "weighted":  # lm_head is linear: the mixture of logits is the head of the mixture
                h = (torch.stack(hiddens, -1)[:, keep] * exit_probs[:, keep, None].to(hiddens[0].dtype)).sum(-1)
            else:
                stacked = torch.stack([x[:, keep] for x in hiddens], 2)  # (B, S', T, d)
                idx = out.exit_steps[:, keep, None, None].expand(-1, -1, 1, stacked.shape[-1])
                h = stacked.gather(2, idx).squeeze(2)
            logits = self.lm_head(h)

        return LoopLMOutput(
            loss=loss, logits=logits, **{CACHE_NAME: output_cache(out)}, step_losses=step_losses,
            step_logits=tuple(self.lm_head(x) for x in hiddens) if output_step_logits else None,
            exit_probs=exit_probs, gate_probs=torch.sigmoid(gate_logits), exit_steps=out.exit_steps,
            hidden_states=hiddens if output_hidden_states else None,
        )

    def _loss(self, hiddens, gate_logits, targets, objective, entropy_beta, num_items_in_batch):
        mask = targets != IGNORE_INDEX
        chunk = self.config.ce_chunk_size
        if objective == "stage1" and self.config.loss_implementation == "fused" and torch.is_grad_enabled():
            p = exit_distribution(gate_logits)
            normalizer = mask.sum().clamp_min(1) if num_items_in_batch is None else num_items_in_batch
            expected_ce, step_ce = fused_exit_ce(hiddens, self.lm_head.weight, targets, p, normalizer, chunk)
            loss = stage1_loss(None, gate_logits, mask, entropy_beta, normalizer, expected_ce=expected_ce, exit_probs=p)
        elif objective == "stage1":
            step_ce = torch.stack([token_cross_entropy(h, self.lm_head.weight, targets, chunk) for h in hiddens], -1)
            loss = stage1_loss(step_ce, gate_logits, mask, entropy_beta, num_items_in_batch)
        elif objective == "last_pass":
            # Plain next-token CE of the last pass only (the gate gets no gradient); earlier passes reported.
            with torch.no_grad():
                earlier = [token_cross_entropy(h, self.lm_head.weight, targets, chunk) for h in hiddens[:-1]]
            last = token_cross_entropy(hiddens[-1], self.lm_head.weight, targets, chunk)
            step_ce = torch.stack(earlier + [last], -1)
            normalizer = mask.sum().clamp_min(1) if num_items_in_batch is None else num_items_in_batch
            loss = (last * mask).sum() / normalizer
        elif objective == "stage2":
            # The LM is frozen in stage II: per-pass CE without graph, the gate re-read on detached states.
            with torch.no_grad():
                step_ce = torch.stack([token_cross_entropy(h, self.lm_head.weight, targets, chunk) for h in hiddens], -1)
            gate = self.model.early_exit_gate(torch.stack(hiddens, 2).detach()).squeeze(-1)
            loss = stage2_gate_loss(step_ce, gate, mask, self.config.stage2_k, self.config.stage2_gamma,
                                    num_items_in_batch)
        else:
            raise ValueError(f"objective={objective!r} is unknown; use one of {OBJECTIVES}")
        step_losses = (step_ce.detach() * mask[..., None]).sum((0, 1)) / mask.sum().clamp_min(1)
        return loss, step_losses


def compile_layers(model, **compile_kwargs):
    """Regional compilation (torchtitan compiles per transformer block): `torch.compile` each of the N
    shared layers in place, once; the same compiled code then serves all T passes. Parameter names
    and checkpoints are unchanged; activation checkpointing wraps the compiled layer. Row counts vary
    in early-exit decoding, so shapes are marked dynamic after the first change (torch's default)."""
    for layer in getattr(model, "model", model).layers:
        layer.compile(**compile_kwargs)
    return model
