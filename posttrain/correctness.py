"""A Gnosis-style correctness head (spec/memgen_ltpo_gnosis.md 3): from the frozen reasoner's final
hidden states over prompt + (latents) + completion and the completion's token probabilities, predict
P(final answer correct). Trained with BCE on the reasoner's own completions labelled by exact match.

Streams (attention maps are not exposed by SDPA/FlashAttention through the standard interface, so
they are left out; Gnosis' optional confidence stream is used instead):
* hidden: LayerNorm -> Linear(d -> w) -> adaptive average pool over time to 64 steps -> three dilated
  grouped Conv1d blocks (residual) -> attention pooling with 3 learned seeds -> MLP -> w;
* confidence: per completion token [p(token), log p(token), entropy] -> Linear -> pool -> conv ->
  attention pooling -> MLP -> w / 2;
* fusion: a softmax gate over the two streams (LayerNorm + Linear -> 1 each), concatenation, MLP -> 1.
Width w = clamp(d / 4, 32, 512): about 5M parameters for a 2048-wide reasoner.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from looplm.objectives import IGNORE_INDEX, shift_labels

from .augment import splice_completions
from .reasoner import ReasonerError, forward_embeds, last_hidden

POOL = 64


class _Stream(nn.Module):
    def __init__(self, d_in: int, width: int, seeds: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, width))
        self.convs = nn.ModuleList(nn.Sequential(
            nn.Conv1d(width, width, 5, padding=2 * dil, dilation=dil, groups=8 if width % 8 == 0 else 1),
            nn.GroupNorm(8 if width % 8 == 0 else 1, width), nn.GELU()) for dil in (1, 2, 4))
        self.seeds = nn.Parameter(torch.randn(seeds, width) * 0.02)
        self.attn = nn.MultiheadAttention(width, 4 if width % 4 == 0 else 1, batch_first=True)
        self.out = nn.Sequential(nn.Linear(seeds * width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, sequences: list[torch.Tensor]) -> torch.Tensor:
        """sequences: B tensors (L_i, d_in) of real positions -> (B, width)."""
        pooled = torch.stack([F.adaptive_avg_pool1d(self.proj(s.float()).T[None], POOL)[0] for s in sequences])
        x = pooled  # (B, width, POOL)
        for conv in self.convs:
            x = x + conv(x)
        x = x.transpose(1, 2)
        seeds = self.seeds.expand(x.shape[0], -1, -1)
        summary, _ = self.attn(seeds, x, x)
        return self.out(summary.flatten(1))


def summary_statistics(token_stats: list[torch.Tensor]) -> torch.Tensor:
    """Per completion: mean p, mean and min log p, mean and max entropy of its tokens -> (B, 5)."""
    rows = []
    for s in token_stats:
        s = s.float()
        logp = s[:, 1].clamp_min(-30.0)
        rows.append(torch.stack([s[:, 0].mean(), logp.mean(), logp.min(), s[:, 2].mean(), s[:, 2].max()]))
    return torch.stack(rows)


class CorrectnessHead(nn.Module):
    """draft_tokens: how much of a completion the head reads (None = all of it, 0 = prompt and latents
    only); it predicts the correctness of the full completion either way (Correctness-LTPO's cost).
    summary: the confidence stream also reads `summary_statistics` of the whole token sequence through
    a linear map (added to its pooled output). Without it, on the 0.5M-parameter word-problem reasoner
    the trained head (held-out AUROC 0.74) lost to the untrained mean token log-prob alone (0.84):
    pooling and convolutions did not recover a sequence mean from a few thousand examples."""

    def __init__(self, hidden_size: int, width: int | None = None, draft_tokens: int | None = None,
                 summary: bool = True):
        super().__init__()
        w = width or max(32, min(512, hidden_size // 4))
        self.hidden_size, self.width, self.draft_tokens, self.summary = hidden_size, w, draft_tokens, summary
        self.hidden = _Stream(hidden_size, w, seeds=3)
        self.confidence = _Stream(3, w // 2, seeds=2)
        self.summary_proj = nn.Linear(5, w // 2) if summary else None
        self.gates = nn.ModuleList([nn.Sequential(nn.LayerNorm(w), nn.Linear(w, 1)),
                                    nn.Sequential(nn.LayerNorm(w // 2), nn.Linear(w // 2, 1))])
        self.mlp = nn.Sequential(nn.LayerNorm(w + w // 2), nn.Linear(w + w // 2, w), nn.GELU(), nn.Linear(w, 1))

    def forward(self, hidden: list[torch.Tensor], token_stats: list[torch.Tensor]) -> torch.Tensor:
        """hidden: B x (L_i, d) final hidden states; token_stats: B x (C_i, 3) -> logits (B,)."""
        confidence = self.confidence(token_stats)
        if self.summary_proj is not None:
            confidence = confidence + self.summary_proj(summary_statistics(token_stats))
        streams = [self.hidden(hidden), confidence]
        gates = torch.softmax(torch.cat([g(s) for g, s in zip(self.gates, streams)], -1), -1)
        fused = torch.cat([s * gates[:, i:i + 1] for i, s in enumerate(streams)], -1)
        return self.mlp(fused).squeeze(-1)

    def save(self, folder):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / "head.safetensors")
        (folder / "head.json").write_text(json.dumps({"hidden_size": self.hidden_size, "width": self.width,
                                                      "draft_tokens": self.draft_tokens, "summary": self.summary}))


def load_head(folder, hidden_size: int | None = None) -> CorrectnessHead:
    folder = Path(folder)
    if not (folder / "head.json").exists():
        raise ReasonerError(f"{folder} is not a saved correctness head (no head.json)")
    meta = json.loads((folder / "head.json").read_text())
    if hidden_size is not None and meta["hidden_size"] != hidden_size:
        raise ReasonerError(f"correctness head {folder} reads hidden size {meta['hidden_size']}, the reasoner has "
                            f"{hidden_size}; train a head for this reasoner")
    head = CorrectnessHead(meta["hidden_size"], meta["width"], meta.get("draft_tokens"),
                           meta.get("summary", False))  # heads saved before the summary statistics existed
    head.load_state_dict(load_file(folder / "head.safetensors"))
    return head


@torch.no_grad()
def head_inputs(reasoner, embeds: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    """Run the frozen reasoner once over spliced sequences: per row, the final hidden states of its
    real positions and [p, log p, entropy] of each completion token (labels != -100)."""
    out = forward_embeds(reasoner, embeds, mask, output_hidden_states=True)
    hidden, logp = last_hidden(out), torch.log_softmax(out.logits.float(), -1)
    targets = shift_labels(labels)
    hiddens, stats = [], []
    for i in range(embeds.shape[0]):
        hiddens.append(hidden[i][mask[i].bool()])
        at = targets[i] != IGNORE_INDEX
        lp = logp[i][at].gather(-1, targets[i][at][:, None]).squeeze(-1)
        entropy = -(logp[i][at].exp() * logp[i][at]).sum(-1)
        rows = torch.stack([lp.exp(), lp, entropy], -1)
        stats.append(rows if len(rows) else torch.zeros(1, 3))
    return hiddens, stats


def completion_inputs(reasoner, weaver, prompts, tokens, insertions, augment, draft_tokens: int | None = None,
                      prompt_latents: torch.Tensor | None = None):
    """The head's inputs for decoded completions (token ids and insertion points per row, as
    `augment.generate` returns them) cut to their first `draft_tokens` tokens (None: whole; 0: prompt
    and latents only), with the latents spliced in where they were inserted."""
    if draft_tokens is not None:
        tokens = [toks[:draft_tokens] for toks in tokens]
        insertions = [[j for j in ins if j < draft_tokens] for ins in insertions]
    return head_inputs(reasoner, *splice_completions(reasoner, weaver, prompts, tokens, insertions, augment,
                                                     prompt_latents))


def auroc(scores, labels) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction); 0.5 when one class is missing."""
    scores, labels = torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels).bool()
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return 0.5
    greater = (pos[:, None] > neg[None, :]).double().sum() + 0.5 * (pos[:, None] == neg[None, :]).double().sum()
    return float(greater / (len(pos) * len(neg)))


def calibration_error(probs, labels, bins: int = 10) -> float:
    """Expected calibration error over equal-width probability bins."""
    probs, labels = torch.as_tensor(probs, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.float64)
    edges = torch.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (probs >= lo) & ((probs < hi) | (hi == 1))
        if inside.any():
            total += inside.double().mean() * (probs[inside].mean() - labels[inside].mean()).abs()
    return float(total)


def train_head(head: CorrectnessHead, data: list, steps: int = 200, lr: float = 1e-3, batch: int = 16,
               seed: int = 0, valid: list | None = None, eval_every: int = 50) -> list[float]:
    """BCE training on (hidden, token_stats, label) triples; returns the loss per step. With `valid`
    rows, the head keeps the weights of the evaluation (every `eval_every` steps) with the best
    validation AUROC: the hidden stream has about 2k weights per hidden unit and overfits a few
    thousand completions well before `steps` (posttrain_word: train AUROC 0.94, held-out 0.74)."""
    opt = torch.optim.AdamW(head.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses, best = [], (-1.0, None)
    for step in range(1, steps + 1):
        head.train()
        idx = torch.randint(len(data), (min(batch, len(data)),), generator=g).tolist()
        logits = head([data[i][0] for i in idx], [data[i][1] for i in idx])
        loss = F.binary_cross_entropy_with_logits(logits, torch.tensor([float(data[i][2]) for i in idx]))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if valid and (step % eval_every == 0 or step == steps):
            head.eval()
            with torch.no_grad():
                score = auroc(head([r[0] for r in valid], [r[1] for r in valid]), [r[2] for r in valid])
            if score > best[0]:
                best = (score, {k: v.clone() for k, v in head.state_dict().items()})
    if best[1] is not None:
        head.load_state_dict(best[1])
    head.eval()
    return losses
