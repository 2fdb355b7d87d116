"""Weaver latents, insertion positions, cached decoding with insertions vs recomputation, M, errors."""

import pytest
import torch

from helpers.reasoners import KINDS, tiny_reasoner
from posttrain.augment import AugmentConfig, batch_splices, generate, splice, token_log_probs
from posttrain.reasoner import ReasonerError, load_reasoner
from posttrain.trigger import FixedTrigger
from posttrain.weaver import Weaver, WeaverConfig, load_weaver

DELIMS = set(range(0, 256, 3))  # every third id is a "delimiter": plenty of insertion points


@pytest.mark.parametrize("kind", KINDS)
def test_latents_have_the_reasoner_embedding_shape_and_dtype(kind):
    reasoner = tiny_reasoner(kind)
    weaver = Weaver(reasoner, WeaverConfig(num_latents=5))
    ctx = reasoner.get_input_embeddings()(torch.randint(0, 256, (3, 7)))
    for k in ("prompt", "inference"):
        lat = weaver(ctx, torch.ones(3, 7, dtype=torch.long), k)
        assert lat.shape == (3, 5, 64) and lat.dtype == ctx.dtype and torch.isfinite(lat).all()
    trainable = {n for n, p in weaver.named_parameters() if p.requires_grad}
    assert any("lora" in n for n in trainable) and not any("lora" not in n and ".lm." in f".{n}" for n in trainable)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy,M", [("always", 2), ("every:2", 5), ("never", 5)])
def test_insertions_follow_the_policy_and_respect_M(kind, policy, M):
    reasoner = tiny_reasoner(kind)
    weaver = Weaver(reasoner, WeaverConfig(num_latents=3))
    gen = generate(reasoner, weaver, [[5, 6, 7, 8], [9, 10]], AugmentConfig(max_insertions=M),
                   FixedTrigger(policy), DELIMS, max_new_tokens=14, eos_id=None)
    every = {"always": 1, "every:2": 2, "never": 0}[policy]
    for tokens, inserted in zip(gen.tokens, gen.insertions):
        delimiter_positions = [i for i, t in enumerate(tokens) if t in DELIMS]
        expected = [] if not every else delimiter_positions[::every][:M] if every == 1 else [
            p for j, p in enumerate(delimiter_positions) if j % every == 0][:M]
        assert inserted == expected
        assert len(inserted) <= M


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_with_insertions_equals_recomputation(kind):
    reasoner = tiny_reasoner(kind)
    weaver = Weaver(reasoner, WeaverConfig(num_latents=3))
    prompts = [[5, 6, 7, 8, 11], [9, 10]]
    aug = AugmentConfig(max_insertions=3)
    with torch.no_grad():
        gen = generate(reasoner, weaver, prompts, aug, FixedTrigger("always"), DELIMS, max_new_tokens=16, eos_id=None)
        assert all(len(i) >= 1 for i in gen.insertions)  # the case under test really inserted
        examples = [splice(reasoner, weaver, p, t, i, aug) for p, t, i in zip(prompts, gen.tokens, gen.insertions)]
        embeds, labels, mask = batch_splices(examples)
        logp = token_log_probs(reasoner, embeds, labels, mask)
    for row, tokens in enumerate(gen.tokens):
        cached = torch.stack([torch.log_softmax(gen.step_logits[s][row], -1)[t] for s, t in enumerate(tokens)])
        recomputed = logp[row][torch.roll(labels[row] != -100, -1)]
        torch.testing.assert_close(recomputed, cached, atol=1e-4, rtol=1e-4)
        # greedy: each token is the argmax of the recomputed distribution too
        positions = torch.roll(labels[row] != -100, -1).nonzero().flatten()
        full = reasoner(inputs_embeds=embeds[row:row + 1], attention_mask=mask[row:row + 1],
                        position_ids=(mask[row:row + 1].cumsum(-1) - 1), use_cache=False).logits[0]
        assert full[positions].argmax(-1).tolist() == tokens


def test_save_load_round_trip_and_bad_checkpoints(tmp_path):
    reasoner = tiny_reasoner("looplm")
    weaver = Weaver(reasoner, WeaverConfig(num_latents=4, reasoner="tiny"))
    weaver.save(tmp_path / "w")
    again = load_weaver(reasoner, tmp_path / "w")
    ctx = torch.randn(1, 5, 64)
    ones = torch.ones(1, 5, dtype=torch.long)
    torch.testing.assert_close(again(ctx, ones, "prompt"), weaver(ctx, ones, "prompt"))
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=4))
    with pytest.raises(ReasonerError, match="hidden size 64"):
        load_weaver(wide, tmp_path / "w")
    with pytest.raises(ReasonerError, match="no config.json"):
        load_reasoner(tmp_path / "missing")
    with pytest.raises(ReasonerError, match="not a saved weaver"):
        load_weaver(reasoner, tmp_path)


def test_pause_latents_are_the_mapped_queries_whatever_the_context(tmp_path):
    """The control of issue 28: the same module and insertions, latents that do not read the context."""
    reasoner = tiny_reasoner("looplm")
    torch.manual_seed(0)
    pause = Weaver(reasoner, WeaverConfig(num_latents=3, latents="pause"))
    a, b = torch.randn(2, 5, 64), torch.randn(1, 9, 64)
    out_a = pause(a, torch.ones(2, 5, dtype=torch.long), "inference")
    out_b = pause(b, torch.ones(1, 9, dtype=torch.long), "inference")
    with torch.no_grad():  # independently: LayerNorm by hand, scaled, through the output map
        q = pause.queries["inference"]
        normed = (q - q.mean(-1, keepdim=True)) / (q.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        normed = normed * pause.norms["inference"].weight + pause.norms["inference"].bias
        expected = pause.proj_out(pause.scales["inference"] * normed)
    torch.testing.assert_close(out_a, expected.expand(2, 3, -1))
    torch.testing.assert_close(out_b[0], expected)
    trainable = {n.split(".")[0] for n, p in pause.named_parameters() if p.requires_grad}
    assert trainable == {"lm", "proj_out", "queries", "norms", "scales"}  # the LoRA decodes; no input map
    woven = Weaver(reasoner, WeaverConfig(num_latents=3))
    assert not torch.allclose(woven(a, torch.ones(2, 5, dtype=torch.long), "inference")[0],
                              woven(a, torch.ones(2, 5, dtype=torch.long), "inference")[1])  # woven ones do read it
    pause.save(tmp_path / "pause")
    again = load_weaver(reasoner, tmp_path / "pause")
    assert again.config.latents == "pause"
    torch.testing.assert_close(again(b, torch.ones(1, 9, dtype=torch.long), "inference"), out_b)


class _Inserting(torch.nn.Module):
    """Another module's latents, inserted into whatever decoder `generate` is given (a woven weaver's role)."""

    def __init__(self, module):
        super().__init__()
        self.module, self.config = module, WeaverConfig(num_latents=module.config.num_latents)

    def forward(self, context, mask, kind):
        return self.module(context, mask, kind)


@pytest.mark.parametrize("latents", ["none", "pause"])
def test_the_lora_sft_controls_decode_with_the_lora_adapted_copy(latents):
    """The controls of issue 28: what decodes is the reasoner with the control's LoRA folded in (merged
    independently by peft), with nothing inserted (none) or the pause tokens at the delimiters (pause);
    the frozen reasoner itself is not what decodes."""
    import copy

    reasoner = tiny_reasoner("looplm")
    torch.manual_seed(0)
    control = Weaver(reasoner, WeaverConfig(num_latents=3, latents=latents))
    with torch.no_grad():  # a trained LoRA: B away from its zero initialisation
        for name, param in control.lm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    merged = copy.deepcopy(control.lm).merge_and_unload()
    prompts, augment = [[5, 6, 7, 8], [9, 10]], AugmentConfig(max_insertions=2)
    got = generate(reasoner, control, prompts, augment, FixedTrigger("always"), DELIMS, 10, eos_id=None)
    expected = generate(merged, None if latents == "none" else _Inserting(control), prompts, augment,
                        FixedTrigger("always"), DELIMS, 10, eos_id=None)
    assert got.tokens == expected.tokens and got.insertions == expected.insertions
    torch.testing.assert_close(torch.stack(got.step_logits), torch.stack(expected.step_logits), atol=1e-4, rtol=1e-4)  # merged: rounding
    assert (latents == "pause") == any(got.insertions)
    plain = generate(reasoner, None, prompts, augment, FixedTrigger("always"), DELIMS, 10, eos_id=None)
    assert not torch.allclose(plain.step_logits[0], got.step_logits[0])
    embeds, labels = splice(reasoner, control, [5, 6], [7, 8, 9], [0], augment)
    assert embeds.shape[0] == (5 if latents == "none" else 5 + 2 * 3)  # prompt and inference latents, or none
