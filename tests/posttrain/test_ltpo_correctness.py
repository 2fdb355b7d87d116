"""LTPO (reward, update, weights untouched, early stop) and the correctness head."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from helpers.reasoners import tiny_reasoner
from posttrain.correctness import CorrectnessHead, auroc, calibration_error, head_inputs, load_head, train_head
from posttrain.ltpo import LTPOConfig, confidence, confidence_reward, optimize
from posttrain.reasoner import prompt_embeds


def test_confidence_equals_an_independent_computation():
    logits = torch.randn(2, 3, 50)
    probs = torch.softmax(logits, -1)
    expected = torch.zeros(2)
    for b in range(2):
        per_position = [-(sorted(probs[b, p].tolist(), reverse=True)[:10] and
                          sum(torch.log(torch.tensor(sorted(probs[b, p].tolist(), reverse=True)[:10])).tolist()) / 10)
                        for p in range(3)]
        expected[b] = sum(per_position) / 3
    torch.testing.assert_close(confidence(logits, 10), expected)
    mean_top_prob = torch.tensor([sum(sum(sorted(probs[b, p].tolist(), reverse=True)[:10]) / 10 for p in range(3)) / 3
                                  for b in range(2)])
    torch.testing.assert_close(confidence(logits, 10, "probability"), mean_top_prob)


def test_ltpo_increases_a_toy_reward_on_average():
    target = torch.randn(1, 4, 8)

    def reward(h):
        return -((h - target) ** 2).sum((1, 2))

    gains = []
    for seed in range(20):
        start = torch.zeros(3, 4, 8)
        result = optimize(start, reward, LTPOConfig(lr=0.003, sigma=0.1, steps=10),
                          generator=torch.Generator().manual_seed(seed))
        gains.append((result.reward - result.initial_reward).mean().item())
        torch.testing.assert_close(result.reward, reward(result.latents))  # the best kept is what was scored
    assert sum(gains) / len(gains) > 0 and sum(g > 0 for g in gains) >= 15


def test_ltpo_on_a_reasoner_returns_its_best_latents_scored_independently_and_leaves_weights_bit_identical():
    reasoner = tiny_reasoner("looplm")
    before = {k: v.clone() for k, v in reasoner.state_dict().items()}
    prompts = [[5, 6, 7], [8, 9]]
    embeds, mask = prompt_embeds(reasoner, prompts)
    reward, scored = confidence_reward(reasoner, embeds, mask), []

    def recording(h):
        r = reward(h)
        scored.append(r)
        return r

    start = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(1)) * 0.1
    result = optimize(start, recording, LTPOConfig(), generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def independent(b, latents):  # row b alone, unpadded, through the model's embedding table; top-10 -log p in fp64
        seq = torch.cat([reasoner.get_input_embeddings()(torch.tensor([prompts[b]])), latents[None]], 1)
        logits = reasoner(inputs_embeds=seq, use_cache=False).logits[0, -latents.shape[0]:].double()
        top = torch.log_softmax(logits, -1).sort(-1, descending=True).values[:, :10]
        return -top.mean().item()

    for b in range(2):
        assert result.initial_reward[b].item() == pytest.approx(independent(b, start[b]), rel=1e-4)
        assert result.reward[b].item() == pytest.approx(independent(b, result.latents[b]), rel=1e-4)
        assert result.reward[b] == max(r[b] for r in scored)  # the best of every scored candidate is returned
    assert result.steps.tolist() == [10, 10] and len(scored) == 1 + 2 * 10
    assert (result.reward > result.initial_reward).any()  # the search found better latents than the start
    assert all(torch.equal(before[k], v) for k, v in reasoner.state_dict().items())


def test_correctness_style_early_stop_at_the_threshold():
    calls = []

    def reward(h):  # the "probability" rises by 0.2 per evaluation: crosses 0.95 on the third
        calls.append(1)
        return torch.full((h.shape[0],), min(0.2 * len(calls), 0.99))

    result = optimize(torch.zeros(2, 2, 4), reward, LTPOConfig(stop_at=0.95, steps=10))
    assert (result.reward >= 0.95).all() and result.steps.tolist() == [2, 2]


def test_correctness_head_learns_a_separable_labelling_and_its_loss_is_bce(tmp_path):
    torch.manual_seed(0)
    data = []
    direction = torch.cat([torch.ones(8), -torch.ones(8)])  # a pattern LayerNorm does not remove
    for i in range(64):  # label = sign of that direction in the hidden states
        label = i % 2
        hidden = torch.randn(int(torch.randint(3, 20, ())), 16) + (1.0 if label else -1.0) * direction
        data.append((hidden, torch.rand(5, 3), label))
    head = CorrectnessHead(16)
    train_head(head, data[:48], steps=150, lr=3e-3)
    with torch.no_grad():
        probs = torch.sigmoid(head([d[0] for d in data[48:]], [d[1] for d in data[48:]]))
    assert auroc(probs, [d[2] for d in data[48:]]) > 0.95
    with torch.no_grad():
        logits = head([d[0] for d in data[:8]], [d[1] for d in data[:8]])
    labels = torch.tensor([float(d[2]) for d in data[:8]])
    p = torch.sigmoid(logits.double())
    independent = -(labels * torch.log(p) + (1 - labels) * torch.log(1 - p)).mean()
    torch.testing.assert_close(F.binary_cross_entropy_with_logits(logits, labels).double(), independent,
                               atol=1e-6, rtol=1e-6)
    head.save(tmp_path / "h")
    again = load_head(tmp_path / "h", 16)
    with torch.no_grad():
        torch.testing.assert_close(again([d[0] for d in data[:4]], [d[1] for d in data[:4]]),
                                   head([d[0] for d in data[:4]], [d[1] for d in data[:4]]))


def test_auroc_and_calibration_against_hand_values():
    assert auroc([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0]) == 1.0
    assert auroc([0.1, 0.8, 0.3, 0.9], [1, 1, 0, 0]) == 0.25  # 1 of 4 (pos, neg) pairs ordered
    assert auroc([0.5, 0.5], [1, 0]) == 0.5
    assert calibration_error([1.0, 0.0], [1, 0]) == 0.0
    assert calibration_error([0.75, 0.75, 0.75, 0.75], [1, 1, 1, 0]) == pytest.approx(0.0)
    assert calibration_error([0.95, 0.95], [0, 0]) == pytest.approx(0.95)


def test_head_inputs_and_parameter_count():
    reasoner = tiny_reasoner("llama")
    embeds = reasoner.get_input_embeddings()(torch.randint(0, 256, (2, 6)))
    labels = torch.tensor([[-100, -100, 5, 6, 7, -100], [-100, -100, -100, 1, 2, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    hidden, stats = head_inputs(reasoner, embeds, labels, mask)
    assert [h.shape for h in hidden] == [(5, 64), (6, 64)] and [s.shape for s in stats] == [(3, 3), (3, 3)]
    assert ((stats[0][:, 0] > 0) & (stats[0][:, 0] <= 1)).all()
    big = sum(p.numel() for p in CorrectnessHead(2048).parameters())
    assert 3e6 < big < 7e6  # "about 5M" at the seed scale


@pytest.mark.parametrize("draft", [None, 2, 0])
def test_completion_inputs_read_the_draft_only(draft):
    """The head's inputs for a draft of N tokens equal those of the answer cut by hand to N tokens,
    latents included where they were inserted; with 0 the head reads prompt + latents only."""
    from posttrain.augment import AugmentConfig, batch_splices, splice
    from posttrain.correctness import completion_inputs
    from posttrain.weaver import Weaver, WeaverConfig

    torch.manual_seed(0)
    reasoner = tiny_reasoner("looplm")
    weaver = Weaver(reasoner, WeaverConfig(num_latents=2, lora_r=2, lora_alpha=4)).eval()
    augment = AugmentConfig(max_insertions=2)
    prompts, tokens, insertions = [[5, 6, 7], [8, 9]], [[10, 11, 12, 13], [14, 15, 16]], [[0, 2], [1]]
    with torch.no_grad():
        hidden, stats = completion_inputs(reasoner, weaver, prompts, tokens, insertions, augment, draft)
    n = 99 if draft is None else draft
    cut = [(t[:n], [j for j in ins if j < n]) for t, ins in zip(tokens, insertions)]
    with torch.no_grad():
        expected = head_inputs(reasoner, *batch_splices([splice(reasoner, weaver, p, t, ins, augment)
                                                         for p, (t, ins) in zip(prompts, cut)]))
    for got, want in zip(hidden + stats, expected[0] + expected[1]):
        torch.testing.assert_close(got, want)
    latents = 2 * (1 + torch.tensor([len(ins) for _, ins in cut]))
    assert [h.shape[0] for h in hidden] == (torch.tensor([len(p) + len(t) for p, (t, _) in zip(prompts, cut)])
                                            + latents).tolist()
    if draft == 0:
        assert all(torch.equal(s, torch.zeros(1, 3)) for s in stats)


def test_head_keeps_its_draft_length(tmp_path):
    CorrectnessHead(16, draft_tokens=8).save(tmp_path / "h8")
    CorrectnessHead(16).save(tmp_path / "whole")
    assert load_head(tmp_path / "h8", 16).draft_tokens == 8 and load_head(tmp_path / "whole", 16).draft_tokens is None


def test_no_draft_reward_decodes_nothing(monkeypatch):
    """Correctness-LTPO with a prompt-only head scores prompt + candidate latents without decoding."""
    import posttrain.evaluate as evaluate
    from posttrain.augment import AugmentConfig, batch_splices, splice
    from posttrain.trigger import FixedTrigger

    def no_decoding(*args, **kwargs):
        raise AssertionError("a no-draft reward must not decode")

    monkeypatch.setattr(evaluate, "generate", no_decoding)
    torch.manual_seed(0)
    reasoner, head = tiny_reasoner("looplm"), CorrectnessHead(64, draft_tokens=0).eval()
    prompts, latents = [[5, 6, 7], [8, 9]], torch.randn(2, 3, 64)
    augment = AugmentConfig(prompt_augment=True, max_insertions=0)
    reward = evaluate.correctness_reward(reasoner, None, head, prompts, augment, FixedTrigger("always"), set(), 0, 2)
    with torch.no_grad():
        got = reward(latents)
        examples = [splice(reasoner, None, p, [], [], augment, prompt_latents=latents[i:i + 1])
                    for i, p in enumerate(prompts)]
        expected = torch.sigmoid(head(*head_inputs(reasoner, *batch_splices(examples))))
    torch.testing.assert_close(got, expected)


def test_head_training_keeps_the_weights_with_the_best_validation_auroc():
    torch.manual_seed(0)
    rows = [(torch.randn(int(torch.randint(3, 12, ())), 16), torch.rand(4, 3), int(torch.rand(()) < 0.4))
            for _ in range(60)]
    train, valid = rows[:40], rows[40:]

    def valid_auroc(head):
        with torch.no_grad():
            return auroc(head([r[0] for r in valid], [r[1] for r in valid]), [r[2] for r in valid])

    scores = []
    for steps in (10, 20, 30):  # the same trajectory, stopped at each evaluation
        torch.manual_seed(1)
        head = CorrectnessHead(16)
        train_head(head, train, steps=steps, lr=3e-3)
        scores.append(valid_auroc(head))
    torch.manual_seed(1)
    selected = CorrectnessHead(16)
    train_head(selected, train, steps=30, lr=3e-3, valid=valid, eval_every=10)
    assert valid_auroc(selected) == max(scores)
    assert len(set(scores)) > 1  # the evaluations differ, so the selection is exercised


def test_summary_statistics_and_heads_saved_before_them_still_load(tmp_path):
    from posttrain.correctness import summary_statistics

    stats = torch.tensor([[0.5, math.log(0.5), 0.7], [0.25, math.log(0.25), 1.1], [1.0, 0.0, 0.0]])
    got = summary_statistics([stats])[0]
    want = [(0.5 + 0.25 + 1.0) / 3, (math.log(0.5) + math.log(0.25)) / 3, math.log(0.25), 1.8 / 3, 1.1]
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)
    old = CorrectnessHead(16, summary=False)
    old.save(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "head.json").read_text())
    del meta["summary"]  # what a head saved before summary statistics existed carries
    (tmp_path / "old" / "head.json").write_text(json.dumps(meta))
    loaded = load_head(tmp_path / "old")
    assert loaded.summary_proj is None and set(loaded.state_dict()) == set(old.state_dict())
