"""Latent insertion into a frozen reasoner: prompt augmentation (K latents after the prompt) and
inference augmentation (K latents after delimiter tokens while decoding, at most M per answer).

`generate` decodes with the reasoner's KV cache kept: an inserted block enters the cache like tokens
(a row that does not insert at that step gets K masked padding slots, which take no position and are
never attended). `splice` builds the same sequence by teacher forcing (SFT, GRPO log-probs): latents
are spliced into the input embeddings and get label -100, so the last latent predicts the next token.
`score_completions` decodes problems and marks each completion correct or not (GRPO and trigger
rollouts, the correctness head's data, the evaluation table).
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from looplm.compat import output_cache
from looplm.objectives import IGNORE_INDEX, shift_labels

from .data import ANSWER_PATTERN, is_correct
from .reasoner import embed, forward_embeds, last_hidden, prompt_embeds
from .weaver import decoding


@dataclass
class AugmentConfig:
    prompt_augment: bool = True
    max_insertions: int = 5  # M: inference insertions per answer
    delimiters: list = field(default_factory=lambda: [",", ".", "\n"])


def delimiter_ids(tokenizer, delimiters) -> set[int]:
    """Token ids whose text ends with one of the delimiter strings."""
    ids = set()
    for i in range(tokenizer.vocab_size):
        text = tokenizer.decode([i])
        if text and any(text.endswith(d) for d in delimiters):
            ids.add(i)
    return ids


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per row (up to and including EOS)
    insertions: list[list[int]]  # per row: indices into `tokens` after which latents were inserted
    embeds: torch.Tensor  # (B, S, d) everything the reasoner consumed (prompt, latents, tokens, padding)
    mask: torch.Tensor  # (B, S) 1 = real input
    step_logits: list[torch.Tensor]  # the next-token logits (B, V) used at every decoding step
    trigger_log_probs: list[list[torch.Tensor]] = field(default_factory=list)  # learned trigger decisions


def _forward(reasoner, embeds, mask, cache, new):
    """Run the last `new` inputs with the cache; returns logits (B, new, V), last hidden, cache."""
    out = forward_embeds(reasoner, embeds[:, -new:], mask, cache, use_cache=True, output_hidden_states=True)
    return out.logits, last_hidden(out), output_cache(out)


def generate(reasoner, weaver, prompts: list[list[int]], augment: AugmentConfig, trigger, delims: set[int],
             max_new_tokens: int, eos_id: int | None, pad_id: int = 0, sample: bool = False,
             temperature: float = 1.0, generator: torch.Generator | None = None,
             prompt_latents: torch.Tensor | None = None) -> Generation:
    """Decode B prompts (left-padded) with latents inserted as `augment` and `trigger` say.
    weaver=None decodes the plain reasoner; a control weaver decodes with its LoRA'd LM (`decoding`).
    prompt_latents (B, K, d) replaces the weaver's prompt latents (test-time optimisation)."""
    reasoner, weaver = decoding(reasoner, weaver)
    embeds, mask = prompt_embeds(reasoner, prompts, pad_id)
    B, device = len(prompts), embeds.device
    if prompt_latents is not None or (weaver is not None and augment.prompt_augment):
        latents = prompt_latents if prompt_latents is not None else weaver(embeds, mask, "prompt")
        embeds = torch.cat([embeds, latents.to(embeds.dtype)], 1)
        mask = torch.cat([mask, mask.new_ones(B, latents.shape[1])], 1)
    logits, hidden, cache = _forward(reasoner, embeds, mask, None, embeds.shape[1])
    next_logits, state = logits[:, -1].float(), hidden[:, -1]
    tokens, insertions = [[] for _ in range(B)], [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    counts = [0] * B
    step_logits, decisions = [], [[] for _ in range(B)]
    for _ in range(max_new_tokens):
        step_logits.append(next_logits)
        if sample:
            probs = torch.softmax(next_logits / temperature, -1)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            tok = next_logits.argmax(-1)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        for i in range(B):
            if not done[i]:
                tokens[i].append(int(tok[i]))
        new_embed = embed(reasoner, tok[:, None])
        insert = torch.zeros(B, dtype=torch.bool, device=device)
        if weaver is not None:
            for i in range(B):
                if done[i] or int(tok[i]) not in delims or counts[i] >= augment.max_insertions:
                    continue
                decision, log_prob = trigger.decide(state[i], counts[i], len(decisions[i]))
                decisions[i].append(log_prob)
                if decision:
                    insert[i] = True
                    counts[i] += 1
                    insertions[i].append(len(tokens[i]) - 1)
        done = done | (tok == eos_id) if eos_id is not None else done
        embeds = torch.cat([embeds, new_embed], 1)
        mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
        if insert.any():
            K = weaver.config.num_latents
            block = torch.zeros(B, K, embeds.shape[-1], dtype=embeds.dtype, device=device)
            rows = insert.nonzero().squeeze(-1)
            block[rows] = weaver(embeds[rows], mask[rows], "inference").to(embeds.dtype)
            embeds = torch.cat([embeds, block], 1)
            mask = torch.cat([mask, insert[:, None].long().expand(B, K)], 1)
            logits, hidden, cache = _forward(reasoner, embeds, mask, cache, 1 + K)
            last = torch.where(insert, K, 0)  # a row without latents reads its token's position
            arange = torch.arange(B, device=device)
            next_logits, state = logits[arange, last].float(), hidden[arange, last]
        else:
            logits, hidden, cache = _forward(reasoner, embeds, mask, cache, 1)
            next_logits, state = logits[:, -1].float(), hidden[:, -1]
        if done.all():
            break
    return Generation(tokens, insertions, embeds, mask, step_logits, decisions)


def splice(reasoner, weaver, prompt: list[int], answer: list[int], insert_after: list[int], augment: AugmentConfig,
           prompt_latents: torch.Tensor | None = None):
    """Teacher-forced input of one example: (embeds (S, d), labels (S,)). Latents are placed after the
    prompt (prompt augmentation) and after answer token indices `insert_after`, each produced by the
    weaver from everything before it, earlier latents included (`generate`'s models: `decoding`; without
    a weaver nothing is inserted)."""
    reasoner, weaver = decoding(reasoner, weaver)
    insert_after = insert_after if weaver is not None else []
    device = reasoner.get_input_embeddings().weight.device
    pieces, labels = [embed(reasoner, torch.tensor(prompt, device=device))], [torch.full((len(prompt),), IGNORE_INDEX)]

    def add_latents(kind):
        context = torch.cat(pieces)[None]
        latents = (prompt_latents if kind == "prompt" and prompt_latents is not None
                   else weaver(context, torch.ones(context.shape[:2], dtype=torch.long, device=device), kind))[0]
        pieces.append(latents.to(context.dtype))
        labels.append(torch.full((latents.shape[0],), IGNORE_INDEX))

    if prompt_latents is not None or (weaver is not None and augment.prompt_augment):
        add_latents("prompt")
    start = 0
    for cut in sorted(insert_after):
        pieces.append(embed(reasoner, torch.tensor(answer[start:cut + 1], device=device)))
        labels.append(torch.tensor(answer[start:cut + 1]))
        start = cut + 1
        add_latents("inference")
    if start < len(answer):
        pieces.append(embed(reasoner, torch.tensor(answer[start:], device=device)))
        labels.append(torch.tensor(answer[start:]))
    return torch.cat(pieces), torch.cat(labels).to(device)


def batch_splices(examples: list[tuple[torch.Tensor, torch.Tensor]]):
    """Right-pad spliced examples: (embeds (B, S, d), labels (B, S), mask (B, S))."""
    width = max(e.shape[0] for e, _ in examples)
    embeds = torch.stack([F.pad(e, (0, 0, 0, width - e.shape[0])) for e, _ in examples])
    labels = torch.stack([F.pad(l, (0, width - l.shape[0]), value=IGNORE_INDEX) for _, l in examples])
    mask = torch.stack([F.pad(torch.ones(e.shape[0], dtype=torch.long, device=e.device), (0, width - e.shape[0]))
                        for e, _ in examples])
    return embeds, labels, mask


def splice_completions(reasoner, weaver, prompts, tokens, insertions, augment: AugmentConfig,
                       prompt_latents: torch.Tensor | None = None):
    """`splice` of every decoded completion (token ids and insertion points per row, as `generate`
    returns them), batched by `batch_splices`; prompt_latents (B, K, d): each row's prompt latents."""
    return batch_splices([splice(reasoner, weaver, p, toks, ins, augment,
                                 prompt_latents=None if prompt_latents is None else prompt_latents[i:i + 1])
                          for i, (p, toks, ins) in enumerate(zip(prompts, tokens, insertions))])


def token_log_probs(reasoner, embeds, labels, mask) -> torch.Tensor:
    """log p(label_t | prefix) at every position whose label is a token (0 elsewhere): (B, S)."""
    logits = forward_embeds(reasoner, embeds, mask).logits
    targets = shift_labels(labels)
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
    return logp * (targets != IGNORE_INDEX)


@dataclass
class Completions:
    """One decoded completion per problem, scored by exact match."""
    prompts: list[list[int]]  # the encoded prompts
    generation: Generation
    texts: list[str]
    correct: list[bool]


def score_completions(reasoner, weaver, tok, problems, augment: AugmentConfig, trigger, delims: set[int],
                      max_new_tokens: int, pattern: str = ANSWER_PATTERN, **decoding) -> Completions:
    """Encode each problem's prompt, `generate` (batched; `decoding`: sample, temperature,
    prompt_latents), decode the completions and mark each correct or not (`data.is_correct`)."""
    prompts = [tok.encode(p.prompt) for p in problems]
    gen = generate(reasoner, weaver, prompts, augment, trigger, delims, max_new_tokens, tok.eos_id, **decoding)
    texts = [tok.decode(t) for t in gen.tokens]
    return Completions(prompts, gen, texts, [is_correct(x, p, pattern) for x, p in zip(texts, problems)])
