"""The MemGen weaver (spec/memgen_ltpo_gnosis.md 1.3): K latent vectors in the reasoner's
input-embedding space from the context so far.

As in the official code: the context (the reasoner's input embeddings of prompt, earlier latents and
generated tokens) is mapped by Linear(d_r -> d_w), K learned queries (LayerNorm'd and scaled; one
set for prompt augmentation, one for inference augmentation) are appended, a LoRA-adapted copy of a
causal LM (the weaver LM; by default a copy of the reasoner) encodes the whole sequence, and its
last hidden states at the query positions are mapped back by Linear(d_w -> d_r).

Trainable: LoRA, queries, LayerNorms, scales, both projections. Saved alone (safetensors) with a
small JSON naming the reasoner (weaver.json: the WeaverConfig less init_from; the same dataclass is
the `weaver:` section of the post-training config).

The controls (`latents`, experiments/posttrain_word.py): the same module, LoRA and training, but the
LoRA-adapted copy decodes in place of the frozen reasoner (plain LoRA SFT of the reasoner), with
nothing inserted (`none`) or with learned pause tokens at the latents' places (`pause`: the mapped
queries alone, the same whatever the context). `decoding` gives the model that decodes and what inserts.
"""

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .reasoner import ReasonerError, forward_embeds, freeze, hidden_size, last_hidden

KINDS = ("prompt", "inference")


@dataclass
class WeaverConfig:
    """The weaver's settings; also the `weaver:` section of the post-training config (posttrain/config.py)."""
    num_latents: int = 8  # K
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    reasoner: str = ""  # path of the reasoner the weaver was trained for (training sets it: reasoner.path)
    reasoner_hidden_size: int = 0  # set by Weaver from the reasoner
    init_from: str | None = None  # a saved weaver folder to start from (the config's; not saved in weaver.json)
    # "woven": the weaver's latents, the reasoner frozen; the controls, where the LoRA-adapted copy decodes:
    # "pause" (learned pause tokens inserted where the latents would be) and "none" (nothing inserted)
    latents: str = "woven"


class Weaver(nn.Module):
    def __init__(self, reasoner, config: WeaverConfig, weaver_lm=None):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        self.config = config
        config.reasoner_hidden_size = hidden_size(reasoner)
        base = freeze(copy.deepcopy(reasoner) if weaver_lm is None else weaver_lm)
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=list(config.lora_targets), bias="none")
        self.lm = get_peft_model(base, lora)
        d_r, d_w, k = config.reasoner_hidden_size, hidden_size(base), config.num_latents
        self.proj_in = nn.Linear(d_r, d_w)
        self.proj_out = nn.Linear(d_w, d_r)
        self.queries = nn.ParameterDict({kind: nn.Parameter(torch.randn(k, d_w) * 0.02) for kind in KINDS})
        self.norms = nn.ModuleDict({kind: nn.LayerNorm(d_w) for kind in KINDS})
        self.scales = nn.ParameterDict({kind: nn.Parameter(torch.ones(1)) for kind in KINDS})  # 1-D: DeepSpeed broadcasts it
        dtype = base.get_input_embeddings().weight.dtype
        for module in (self.proj_in, self.proj_out, self.norms):
            module.to(dtype)
        if config.latents != "woven":  # the LoRA'd LM decodes; no context is mapped into it
            self.proj_in.requires_grad_(False)
        if config.latents == "none":  # nothing is inserted: the LoRA alone trains
            for module in (self.proj_out, self.queries, self.norms, self.scales):
                module.requires_grad_(False)

    def forward(self, context: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
        """context (B, S, d_r) reasoner input embeddings, mask (B, S) 1 = real -> latents (B, K, d_r)."""
        B, K = context.shape[0], self.config.num_latents
        queries = self.scales[kind] * self.norms[kind](self.queries[kind]).to(context.dtype)
        if self.config.latents == "pause":
            return self.proj_out(queries).expand(B, K, -1)
        seq = torch.cat([self.proj_in(context), queries.expand(B, K, -1)], 1)
        full_mask = torch.cat([mask, mask.new_ones(B, K)], 1)
        out = forward_embeds(self.lm, seq, full_mask, output_hidden_states=True)
        return self.proj_out(last_hidden(out)[:, -K:])

    def trainable_state_dict(self) -> dict:
        return {n: p.detach().cpu().contiguous() for n, p in self.named_parameters() if p.requires_grad}

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.trainable_state_dict(), folder / "weaver.safetensors")
        saved = {k: v for k, v in asdict(self.config).items() if k != "init_from"}  # the format of earlier weavers
        (folder / "weaver.json").write_text(json.dumps(saved, indent=2))

    def load(self, folder: str | Path) -> None:
        """Load trainable weights saved by `save`, refusing a checkpoint made for another reasoner."""
        folder = Path(folder)
        if not (folder / "weaver.safetensors").exists():
            raise ReasonerError(f"{folder} holds no weaver.safetensors")
        saved = json.loads((folder / "weaver.json").read_text())
        if saved["reasoner_hidden_size"] != self.config.reasoner_hidden_size:
            raise ReasonerError(f"weaver {folder} was trained for a reasoner of hidden size "
                                f"{saved['reasoner_hidden_size']} ({saved['reasoner']}), this reasoner has "
                                f"{self.config.reasoner_hidden_size}; train a weaver for this reasoner")
        weights = load_file(folder / "weaver.safetensors")
        expected = self.trainable_state_dict()
        if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in weights):
            raise ReasonerError(f"weaver {folder} does not match this weaver's modules (other LoRA or latent "
                                "settings?); use the weaver.json it was saved with")
        self.load_state_dict(weights, strict=False)


def decoding(reasoner, weaver):
    """(the model that decodes, the module that inserts latents or None): the frozen reasoner and the
    weaver; for the controls the weaver's LoRA-adapted LM, with the pause tokens or nothing."""
    if weaver is None or weaver.config.latents == "woven":
        return reasoner, weaver
    return weaver.lm, (weaver if weaver.config.latents == "pause" else None)


def load_weaver(reasoner, folder: str | Path) -> Weaver:
    """A Weaver built from a saved folder's config, with its weights."""
    folder = Path(folder)
    if not (folder / "weaver.json").exists():
        raise ReasonerError(f"{folder} is not a saved weaver (no weaver.json)")
    fields = json.loads((folder / "weaver.json").read_text())
    weaver = Weaver(reasoner, WeaverConfig(**{k: v for k, v in fields.items() if k != "reasoner_hidden_size"}))
    weaver.load(folder)
    return weaver
