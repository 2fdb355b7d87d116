"""LoopLM configuration: the official Ouro `config.json` keys plus looplm's own knobs."""

from transformers import PretrainedConfig

EXIT_POLICIES = ("auto", "last", "fixed", "threshold", "hidden_diff", "weighted")
KV_SHARING_MODES = ("none", "last", "mean")
ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "flex")
OBJECTIVES = ("stage1", "last_pass", "stage2")


class LoopLMConfig(PretrainedConfig):
    """Config of an Ouro-style looped LM.

    The keys and defaults of the official `OuroConfig` are kept (`model_type="ouro"`,
    `total_ut_steps`, `early_exit_threshold`, ...), so official `config.json` files load
    unchanged and ours load in tools that read Ouro. looplm adds:

    * `entropy_beta`: beta of the stage-I objective (paper: 0.1 at T=8, then 0.05).
    * `objective`: "stage1" (LM + gate, entropy-regularised expected loss), "last_pass" (plain CE
      of the last pass, the gate untrained) or "stage2" (gate only, BCE against the
      loss-improvement target with `stage2_k`, `stage2_gamma`).
    * `ce_chunk_size`: tokens per chunk of the per-pass LM head + cross-entropy.
    * `loss_implementation`: "fused" (stage I's CE and its gradients computed chunk by chunk in the
      forward pass, nothing recomputed) or "chunked" (the reference: per-pass chunked CE under
      autograd, each chunk's logits recomputed in backward).
    * `kv_sharing`: decode-time KV sharing across passes ("none", "last", "mean").
    * `early_exit_hidden_diff`: epsilon of the hidden-state-difference exit (None = off).
    * `attention_backend`: "auto" (FlashAttention when installed on a GPU; FlexAttention for packed
      documents on a GPU without it; else SDPA), or "sdpa", "flash", "flex" explicitly.
    * `embedding_init_std`: std of the token embedding at random init (None = `initializer_range`,
      the official init). The sandwich norms add unit-RMS sub-layer outputs to the residual stream,
      so embeddings of std 0.02 are all but erased by the first sub-layer; small models trained
      from scratch learn far faster with 1.0 (README, "Reproducing the paper's findings").
    """

    model_type = "ouro"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]  # the cache under both names (compat.py)

    def __init__(
        self,
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=22016,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        head_dim=None,
        hidden_act="silu",
        max_position_embeddings=32768,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rope_scaling=None,
        attention_dropout=0.0,
        embedding_init_std=None,
        total_ut_steps=4,
        early_exit_threshold=1.0,
        early_exit_step=None,
        early_exit_hidden_diff=None,
        entropy_beta=0.05,
        objective="stage1",
        stage2_k=50.0,
        stage2_gamma=0.005,
        ce_chunk_size=2048,
        loss_implementation="fused",
        kv_sharing="none",
        attention_backend="auto",
        **kwargs,
    ):
        if rope_scaling is not None:
            raise ValueError(
                f"LoopLMConfig: rope_scaling={rope_scaling!r} is not supported (released Ouro models use "
                "plain RoPE, rope_scaling null); set rope_scaling to null and change rope_theta instead."
            )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads if head_dim is None else head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.attention_dropout = attention_dropout
        self.embedding_init_std = embedding_init_std
        self.total_ut_steps = total_ut_steps
        self.early_exit_threshold = early_exit_threshold
        self.early_exit_step = early_exit_step
        self.early_exit_hidden_diff = early_exit_hidden_diff
        self.entropy_beta = entropy_beta
        self.objective = objective
        self.stage2_k = stage2_k
        self.stage2_gamma = stage2_gamma
        self.ce_chunk_size = ce_chunk_size
        self.loss_implementation = loss_implementation
        self.kv_sharing = kv_sharing
        self.attention_backend = attention_backend
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self._validate()

    def _validate(self):
        def bad(key, problem, fix):
            raise ValueError(f"LoopLMConfig.{key}: {problem}; {fix}")

        if self.hidden_act != "silu":
            bad("hidden_act", f"{self.hidden_act!r} is not supported", "Ouro uses 'silu' (SwiGLU)")
        if self.tie_word_embeddings:
            bad("tie_word_embeddings", "tied embeddings are not supported", "Ouro's LM head is untied: set false")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"{self.num_key_value_heads} does not divide "
                f"num_attention_heads={self.num_attention_heads}", "choose a divisor for grouped-query attention")
        if self.total_ut_steps < 1:
            bad("total_ut_steps", f"{self.total_ut_steps} < 1", "run at least one pass")
        if self.kv_sharing not in KV_SHARING_MODES:
            bad("kv_sharing", f"{self.kv_sharing!r} is unknown", f"use one of {KV_SHARING_MODES}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            bad("attention_backend", f"{self.attention_backend!r} is unknown", f"use one of {ATTENTION_BACKENDS}")
        if self.objective not in OBJECTIVES:
            bad("objective", f"{self.objective!r} is unknown", f"use one of {OBJECTIVES}")
        if self.loss_implementation not in ("fused", "chunked"):
            bad("loss_implementation", f"{self.loss_implementation!r} is unknown", "use 'fused' or 'chunked'")
        if self.ce_chunk_size < 1:
            bad("ce_chunk_size", f"{self.ce_chunk_size} < 1", "use a positive number of tokens")


def _ouro(num_hidden_layers: int, **overrides) -> LoopLMConfig:
    # The released Ouro config.json values (spec/ouro.md sections 1.3 and 5.1).
    values = dict(
        vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=num_hidden_layers,
        num_attention_heads=16, num_key_value_heads=16, head_dim=128, max_position_embeddings=65536,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, total_ut_steps=4, early_exit_threshold=1.0,
        bos_token_id=0, eos_token_id=0,
    )
    values.update(overrides)
    return LoopLMConfig(**values)


PRESETS = {
    "ouro-1.4b": lambda **kw: _ouro(24, **kw),
    "ouro-2.6b": lambda **kw: _ouro(48, **kw),
    # A CPU-sized model: seconds per step on a laptop, same architecture.
    "tiny": lambda **kw: LoopLMConfig(**{
        **dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, rope_theta=10000.0,
               total_ut_steps=4, entropy_beta=0.05),
        **kw,
    }),
}


def preset_config(name: str, **overrides) -> LoopLMConfig:
    """A named preset ("ouro-1.4b", "ouro-2.6b", "tiny"), optionally with overridden keys."""
    if name not in PRESETS:
        raise ValueError(f"unknown LoopLM preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
