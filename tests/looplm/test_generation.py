"""KV cache per (pass, layer), sharing modes, early exit that skips compute, batched generation."""

from functools import partial

import pytest
import torch

from helpers.models import tiny_model
from looplm import LoopCache
from looplm.attention import left_pad
from looplm.compat import CACHE_NAME
from looplm.decode import generate_asynchronous, generate_continuous


def greedy(model, ids, n=6, cache=None, **kw):
    """Greedy generate(); a given cache goes in under the name the installed transformers uses."""
    if cache is not None:
        kw[CACHE_NAME] = cache
    out = model.generate(ids, max_new_tokens=n, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0, **kw)
    return out.sequences, torch.stack(out.logits, 1)


@torch.no_grad()
def test_cached_generation_equals_uncached_recomputation():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 7))
    seq, logits = greedy(model, ids, use_cache=True)
    seq_nc, logits_nc = greedy(model, ids, use_cache=False)
    assert torch.equal(seq, seq_nc)
    torch.testing.assert_close(logits, logits_nc, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sharing", ["last", "mean"])
@torch.no_grad()
def test_shared_cache_collapses_the_prefill_as_documented(sharing):
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 8))
    full, shared = LoopCache(2, "none"), LoopCache(2, sharing)
    out_full = model(ids, cache=full, use_cache=True)
    out_shared = model(ids, cache=shared, use_cache=True)
    torch.testing.assert_close(out_shared.logits, out_full.logits)  # prefill itself uses every pass's keys
    T, N = 4, 2
    assert len(shared.keys) == N and len(full.keys) == N * T
    assert full.memory_bytes() == T * shared.memory_bytes()
    for l in range(N):
        per_pass = torch.stack([full.keys[t * N + l] for t in range(T)])
        expected = per_pass[-1] if sharing == "last" else per_pass.mean(0)
        torch.testing.assert_close(shared.keys[l], expected)


@pytest.mark.parametrize("sharing", ["none", "last", "mean"])
@torch.no_grad()
def test_every_sharing_mode_equals_recomputation_when_there_is_one_pass(sharing):
    model = tiny_model(total_ut_steps=1, kv_sharing=sharing)
    ids = torch.randint(0, 256, (2, 5))
    seq, logits = greedy(model, ids)
    seq_nc, logits_nc = greedy(model, ids, use_cache=False)
    assert torch.equal(seq, seq_nc)
    torch.testing.assert_close(logits, logits_nc, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sharing", ["last", "mean"])
@torch.no_grad()
def test_shared_cache_decodes_with_a_quarter_of_the_memory(sharing):
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 6))
    caches = {m: LoopCache(2, m) for m in ("none", sharing)}
    for mode, cache in caches.items():
        seq, logits = greedy(model, ids, cache=cache)
        assert torch.isfinite(logits).all() and seq.shape == (1, 12)
    assert caches["none"].memory_bytes() == 4 * caches[sharing].memory_bytes()


@torch.no_grad()
def test_early_exit_skips_passes_and_equals_dense_selection():
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 6))
    n, N, T = 12, 2, 4
    runs = {}
    for skip in (True, False):
        cache = LoopCache(N)
        model.model.layer_token_applications = 0
        seq, logits = greedy(model, ids, n=n, exit_threshold=0.5, exit_skip=skip, cache=cache)
        runs[skip] = seq, logits, cache, model.model.layer_token_applications
    (seq, logits, cache, used), (seq_d, logits_d, cache_d, used_d) = runs[True], runs[False]
    assert torch.equal(seq, seq_d)
    torch.testing.assert_close(logits, logits_d, atol=1e-5, rtol=1e-5)
    decoded = cache.exit_steps[0, 6:]
    assert (decoded < T - 1).any(), "threshold 0.5 should make some tokens exit early"
    # the prompt runs every pass; each decoded token runs exit_step + 1 passes of N layers
    assert used_d == N * T * (6 + n - 1)
    assert used == N * T * 6 + N * int((decoded + 1).sum())
    assert used < used_d


@torch.no_grad()
def test_copy_forward_fills_the_deeper_slots_of_exited_tokens_consistently():
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 5))
    cache = LoopCache(2)
    seq, logits = greedy(model, ids, n=10, exit_threshold=0.5, cache=cache)
    steps = cache.exit_steps[0]
    N, T = 2, 4
    for pos in range(5, steps.shape[0]):
        e = int(steps[pos])
        for l in range(N):
            for t in range(e + 1, T):
                assert torch.equal(cache.keys[t * N + l][0, :, pos], cache.keys[e * N + l][0, :, pos])
                assert torch.equal(cache.values[t * N + l][0, :, pos], cache.values[e * N + l][0, :, pos])
    # An uncached recomputation of the whole sequence with the same per-token exits gives the same logits.
    full = model(seq[:, :-1], use_cache=False, exit_steps=steps[None], exit_skip=False)
    torch.testing.assert_close(full.logits[:, 4:], logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_fixed_depth_decoding_runs_only_that_many_passes():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 4))
    model.model.layer_token_applications = 0
    seq, logits = greedy(model, ids, n=5, exit_at_step=1)
    # prefill: 2 rows x 4 tokens x all 4 passes x 2 layers; decode: 4 steps x 2 rows x 2 passes x 2 layers
    assert model.model.layer_token_applications == 2 * 4 * 4 * 2 + 4 * 2 * 2 * 2
    ref = model(seq[:, :-1], use_cache=False, exit_at_step=1)
    torch.testing.assert_close(ref.logits[:, 3:], logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw", [{}, {"exit_threshold": 0.5}, {"sharing": "mean"}])
@torch.no_grad()
def test_batched_generation_with_padding_equals_one_by_one(kw):
    model = tiny_model()
    prompts = [torch.randint(1, 256, (n,)) for n in (3, 7, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1

    def extra():
        return {"cache": LoopCache(2, kw["sharing"])} if "sharing" in kw else kw

    seq, logits = greedy(model, ids, n=8, attention_mask=mask, **extra())
    for i, p in enumerate(prompts):
        alone, alone_logits = greedy(model, p[None], n=8, **extra())
        assert torch.equal(seq[i, width:], alone[0, len(p):]), i
        torch.testing.assert_close(logits[i], alone_logits[0], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_a_multi_token_chunk_after_a_prefix_runs_every_pass():
    """Inserted latent vectors (a chunk of embeddings after a cached prefix) never exit early."""
    model = tiny_model()
    cache = LoopCache(2)
    model(torch.randint(0, 256, (1, 5)), cache=cache, use_cache=True)
    model.model.layer_token_applications = 0
    chunk = torch.randn(1, 3, 64)
    out = model(inputs_embeds=chunk, cache=cache, use_cache=True, exit_threshold=0.01)
    assert model.model.layer_token_applications == 3 * 4 * 2  # 3 positions x T passes x N layers
    assert (cache.exit_steps[0, 5:] == 3).all() and (out.exit_steps == 0).all()  # selection still per policy


def test_compiled_layers_give_the_eager_logits_and_early_exit_tokens():
    """Regional compilation (looplm.compile_layers): same logits as eager, and the same greedy tokens
    under early exit, where the live row count changes from step to step."""
    from looplm import compile_layers

    eager = tiny_model()
    compiled = compile_layers(tiny_model())
    ids = torch.randint(0, 256, (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, eager(ids, use_cache=False).logits,
                                   atol=1e-4, rtol=1e-4)
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, exit_threshold=0.5)
        assert torch.equal(compiled.generate(ids, **kw), eager.generate(ids, **kw))


@pytest.mark.parametrize("kw", [{"exit_threshold": 0.5}, {"exit_threshold": 0.3}, {"exit_at_step": 1}, {}])
@torch.no_grad()
def test_pass_asynchronous_decoding_gives_the_lockstep_tokens(kw):
    """looplm.decode.generate_asynchronous (each row at its own pass) produces the tokens of
    generate() with the "last" cache, on left-padded rows whose tokens exit at different passes."""
    model = tiny_model()
    torch.manual_seed(1)
    prompts = [torch.randint(1, 256, (n,)) for n in (3, 7, 5)]
    ids, mask = left_pad([p.tolist() for p in prompts])
    cache = LoopCache(2, "last")
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                              **{CACHE_NAME: cache}, **kw)
    out = generate_asynchronous(model, ids, 12, attention_mask=mask, **kw)
    assert torch.equal(out, expected)
    if "exit_threshold" in kw:  # the case this decoder exists for: rows at different passes in one step
        exits = cache.exit_steps[:, ids.shape[1] + 1:]
        assert (exits.max(0).values != exits.min(0).values).any()


@torch.no_grad()
def test_pass_asynchronous_decoding_stops_rows_at_eos_like_generate():
    model = tiny_model()
    ids = torch.randint(1, 256, (3, 6))
    free = generate_asynchronous(model, ids, 10, exit_threshold=0.5)
    eos = int(free[1, 6 + 3])  # a token row 1 produces mid-way
    expected = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=eos,
                              exit_threshold=0.5, **{CACHE_NAME: LoopCache(2, "last")})
    out = generate_asynchronous(model, ids, 10, exit_threshold=0.5, eos_token_id=eos)
    width = expected.shape[1]  # generate stops once every row has ended; the rest is padding
    assert torch.equal(out[:, :width], expected) and (out[:, width:] == 0).all()
    assert (out[1, 6 + 4:] == 0).all()
    want = out.clone()  # a pad id outside the vocabulary only fills what follows a row's end of sequence
    for row, tokens in enumerate(out[:, 6:]):
        ends = (tokens == eos).nonzero()
        if len(ends):
            want[row, 6 + int(ends[0]) + 1:] = -1
    for static in (False, True):
        padded = generate_asynchronous(model, ids, 10, exit_threshold=0.5, eos_token_id=eos, pad_token_id=-1,
                                       static=static)
        assert torch.equal(padded, want)


def test_pass_asynchronous_decoding_rejects_a_policy_it_cannot_run():
    with pytest.raises(ValueError, match="hidden_diff"):
        generate_asynchronous(tiny_model(early_exit_hidden_diff=0.1), torch.randint(1, 256, (1, 4)), 3)


@pytest.mark.parametrize("kw", [{"exit_threshold": 0.5}, {"exit_at_step": 0}])
@torch.no_grad()
def test_continuous_batching_gives_each_prompt_its_own_tokens(kw):
    """generate_continuous: 5 prompts of different lengths on 2 rows; rows are refilled as requests
    end, rows sit at different passes and columns, and each prompt's tokens equal model.generate with
    the "last" cache on that prompt alone (an independent decoder)."""
    model = tiny_model()
    torch.manual_seed(2)
    prompts = [torch.randint(1, 256, (n,)) for n in (3, 9, 5, 2, 7)]
    lengths = [12, 12, 12, 12, 12]
    out = generate_continuous(model, prompts, 12, batch_size=2, **kw)
    assert [len(o) for o in out] == lengths
    for prompt, tokens in zip(prompts, out):
        expected = model.generate(prompt[None], max_new_tokens=12, do_sample=False, pad_token_id=0,
                                  **{CACHE_NAME: LoopCache(2, "last")}, **kw)
        assert torch.equal(tokens, expected[0, prompt.numel():])


@torch.no_grad()
def test_continuous_batching_ends_requests_at_eos_and_refills_their_rows():
    model = tiny_model()
    torch.manual_seed(3)
    prompts = [torch.randint(1, 256, (n,)) for n in (4, 6, 3, 5)]
    free = generate_continuous(model, prompts, 10, batch_size=3, exit_threshold=0.5)
    eos = int(free[1][3])  # a token prompt 1 produces mid-way
    out = generate_continuous(model, prompts, 10, batch_size=3, exit_threshold=0.5, eos_token_id=eos)
    for tokens, full in zip(out, free):
        ends = (full == eos).nonzero()
        n = int(ends[0]) + 1 if len(ends) else len(full)  # up to and including the first end of sequence
        assert torch.equal(tokens, full[:n])
    assert len(out[1]) <= 4
    # max_new_tokens=1: every request ends at its prefill's token, the rows are refilled at once
    first = generate_continuous(model, prompts, 1, batch_size=2, exit_threshold=0.5)
    assert [t.tolist() for t in first] == [f[:1].tolist() for f in free]


def test_continuous_batching_rejects_malformed_requests():
    model = tiny_model()
    with pytest.raises(ValueError, match="prompt 1"):
        generate_continuous(model, [torch.tensor([1, 2]), torch.tensor([[1, 2]])], 3)
    with pytest.raises(ValueError, match="prompt 0"):
        generate_continuous(model, [torch.tensor([], dtype=torch.long)], 3)
    with pytest.raises(ValueError, match="batch_size"):
        generate_continuous(model, [torch.tensor([1, 2])], 3, batch_size=0)
    assert generate_continuous(model, [], 3) == []


@pytest.mark.parametrize("kw", [{"exit_threshold": 0.5}, {"exit_at_step": 0}, {"exit_at_step": 1}])
@torch.no_grad()
def test_static_decode_step_gives_the_dynamic_tokens(kw):
    """static=True (fixed shapes, no host synchronisation in a tick: the CUDA-graph form) decodes
    left-padded rows at different passes, with an end of sequence, to the dynamic ticks' tokens."""
    model = tiny_model()
    torch.manual_seed(4)
    ids, mask = left_pad([torch.randint(1, 256, (n,)).tolist() for n in (3, 7, 5)])
    free = generate_asynchronous(model, ids, 10, attention_mask=mask, **kw)
    eos = int(free[0, ids.shape[1] + 4])
    for eos_id in (None, eos):
        dynamic = generate_asynchronous(model, ids, 10, attention_mask=mask, eos_token_id=eos_id, **kw)
        static = generate_asynchronous(model, ids, 10, attention_mask=mask, eos_token_id=eos_id, static=True, **kw)
        assert torch.equal(static, dynamic)


@torch.no_grad()
def test_static_decode_step_traces_as_one_graph():
    """What CUDA-graph capture needs of the step: torch.compile(fullgraph=True) traces it without a
    graph break (no host synchronisation, no data-dependent shape); the traced step gives the eager
    step's state. (Capture itself needs a GPU: generate_asynchronous(cuda_graph=True).)"""
    from looplm.decode import _policy, _prefill, _Rows

    model = tiny_model()
    ids = torch.randint(1, 256, (3, 5))
    first, kv = _prefill(model, ids, None, 0.5, None)
    states = []
    for compiled in (False, True):
        rows = _Rows(model, 3, 5 + 6, 6, _policy(model, 0.5, None), None, 0, kv.dtype, ids.device)
        rows.admit(rows.batch, kv, torch.ones_like(ids), first)
        static_tick = partial(rows.tick, static=True)
        step = torch.compile(static_tick, backend="eager", fullgraph=True) if compiled else static_tick
        for _ in range(12):
            step()
        states.append((rows.tokens.clone(), rows.produced.clone(), rows.passes.clone()))
    for eager, traced in zip(*states):
        assert torch.equal(eager, traced)
    assert (states[0][1] > 1).all()  # the ticks did emit tokens


def test_cuda_graph_decoding_refuses_a_cpu_model():
    with pytest.raises(ValueError, match="CUDA"):
        generate_asynchronous(tiny_model(), torch.randint(1, 256, (1, 4)), 3, exit_threshold=0.5, cuda_graph=True)
