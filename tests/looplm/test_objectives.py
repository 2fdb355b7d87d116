"""Exit distribution, stage-I and stage-II objectives and chunked CE against independent computations."""

import pytest
import torch
import torch.nn.functional as F

from helpers.models import tiny_model
from looplm import exit_distribution, exit_entropy, token_cross_entropy


def test_exit_distribution_matches_the_survival_formula():
    g = torch.randn(3, 5, 4) * 3
    p = exit_distribution(g)
    lam = torch.sigmoid(g)
    survival = torch.ones(3, 5)
    for t in range(4):
        expected = survival if t == 3 else lam[..., t] * survival
        torch.testing.assert_close(p[..., t], expected)
        survival = survival * (1 - lam[..., t])
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 5))


def test_exit_distribution_is_fp32_and_saturation_safe():
    g = torch.full((2, 3), 40.0, dtype=torch.bfloat16)  # sigmoid rounds to 1 in bf16
    p = exit_distribution(g)
    assert p.dtype == torch.float32 and torch.isfinite(exit_entropy(p)).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(2))


def _per_token_ce(step_logits, labels):
    """Independent per-pass CE: HF shift, mean over the real targets."""
    return [F.cross_entropy(lg[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="none")
            for lg in step_logits]


def test_stage1_loss_equals_independent_recomputation():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 10))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels, output_step_logits=True, use_cache=False)
    ce = torch.stack(_per_token_ce(out.step_logits, labels), -1)  # (B*(S-1), T)
    lam = out.gate_probs[:, :-1].flatten(0, 1).double()
    T = ce.shape[-1]
    p, survival = [], torch.ones(lam.shape[0], dtype=torch.float64)
    for t in range(T):
        p.append(survival if t == T - 1 else lam[:, t] * survival)
        survival = survival * (1 - lam[:, t])
    p = torch.stack(p, -1)
    keep = labels[:, 1:].flatten() != -100
    per_token = (p * ce.double()).sum(-1) + model.config.entropy_beta * (p * p.log()).sum(-1)
    torch.testing.assert_close(out.loss.double(), per_token[keep].mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.step_losses, ce[keep].mean(0), atol=1e-5, rtol=1e-5)
    assert out.loss.requires_grad


def test_stage2_loss_equals_independent_recomputation_and_only_trains_the_gate():
    model = tiny_model().train()
    ids = torch.randint(0, 256, (2, 9))
    out = model(ids, labels=ids, objective="stage2", output_step_logits=True, use_cache=False)
    ce = torch.stack(_per_token_ce(out.step_logits, ids), -1).double()
    lam = out.gate_probs[:, :-1].flatten(0, 1).double()
    k, gamma, T = model.config.stage2_k, model.config.stage2_gamma, ce.shape[-1]
    total = 0.0
    for t in range(1, T):  # paper steps 2..T
        w = torch.sigmoid(k * ((ce[:, t - 1] - ce[:, t]).clamp_min(0) - gamma))
        bce = -(w * torch.log(1 - lam[:, t]) + (1 - w) * torch.log(lam[:, t]))
        total = total + bce.mean()
    torch.testing.assert_close(out.loss.double(), total / T, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.startswith("model.early_exit_gate"), name


def test_last_pass_loss_is_plain_ce_of_the_last_pass_and_leaves_the_gate_untrained():
    model = tiny_model().train()
    ids = torch.randint(0, 256, (2, 9))
    labels = ids.clone()
    labels[1, :4] = -100
    out = model(ids, labels=labels, objective="last_pass", output_step_logits=True, use_cache=False)
    ce = _per_token_ce(out.step_logits, labels)
    keep = labels[:, 1:].flatten() != -100
    torch.testing.assert_close(out.loss, ce[-1][keep].mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.step_losses, torch.stack(ce, -1)[keep].mean(0), atol=1e-5, rtol=1e-5)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (not name.startswith("model.early_exit_gate")), name


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_chunked_cross_entropy_equals_unchunked(chunk):
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (2, 7))
    targets[1, 2:] = -100
    ce = token_cross_entropy(hidden, weight, targets, chunk)
    ref = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    torch.testing.assert_close(ce, ref.view(2, 7))
    g = torch.randn(2, 7)
    grads = torch.autograd.grad((ce * g).sum(), (hidden, weight))
    ref_grads = torch.autograd.grad((ref.view(2, 7) * g).sum(), (hidden, weight))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_loss_with_global_token_count_accumulates_exactly():
    """Two micro-batches normalised by the global target count sum to the full-batch loss."""
    model = tiny_model()
    ids = torch.randint(0, 256, (4, 8))
    labels = ids.clone()
    labels[1, :5] = -100
    full = model(ids, labels=labels, use_cache=False).loss
    n = int((labels[:, 1:] != -100).sum())
    parts = [model(ids[i:i + 2], labels=labels[i:i + 2], num_items_in_batch=n, use_cache=False).loss for i in (0, 2)]
    torch.testing.assert_close(sum(parts), full)


def test_training_forward_skips_logits_and_checkpointing_keeps_gradients():
    model = tiny_model().train()
    ids = torch.randint(0, 256, (2, 8))
    out = model(ids, labels=ids)
    assert out.logits is None  # training with labels never materialises logits
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5)


def test_stage1_gradients_through_every_pass_equal_an_independent_forward():
    """The whole backward (T passes, gate, entropy, chunked CE) against autograd of the plain formula
    on the independent reference forward: a wrong gradient anywhere would train a model that only
    looks plausible."""
    from helpers.ouro_reference import reference_forward

    model = tiny_model(total_ut_steps=4).double()
    ids = torch.randint(0, 256, (1, 12))
    model(ids, labels=ids, use_cache=False).loss.backward()
    sd = {k: v.detach().clone().requires_grad_(True) for k, v in model.state_dict().items()}
    hiddens, gates = reference_forward(sd, model.config, ids[0])
    ce = torch.stack([F.cross_entropy(h[:-1] @ sd["lm_head.weight"].T, ids[0, 1:], reduction="none")
                      for h in hiddens], -1)
    lam = torch.sigmoid(gates[:-1])
    before = torch.cumprod(torch.cat([torch.ones_like(lam[:, :1]), 1 - lam[:, :-1]], -1), -1)
    p = torch.cat([(lam * before)[:, :-1], before[:, -1:]], -1)  # the last pass takes the rest
    loss = ((p * ce).sum(-1) + model.config.entropy_beta * (p * p.log()).sum(-1)).mean()
    loss.backward()
    for name, param in model.named_parameters():
        scale = sd[name].grad.abs().max().item()
        assert (param.grad - sd[name].grad).abs().max().item() <= 1e-5 * scale + 1e-9, name


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("objective", ["stage1", "stage2"])
def test_fused_loss_has_the_chunked_reference_loss_and_gradients(dtype, tol, objective):
    """loss_implementation=fused (gradients computed in the forward pass) against the chunked
    reference under autograd: same loss, per-pass CE and gradient of every parameter, with ignored
    labels, a global token count (num_items_in_batch) and chunks smaller than the batch."""
    ids = torch.randint(0, 256, (3, 11))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2, 7:] = -100
    results = {}
    for impl in ("fused", "chunked"):
        model = tiny_model(ce_chunk_size=5, loss_implementation=impl).to(dtype).train()
        out = model(ids, labels=labels, num_items_in_batch=torch.tensor(40.0), objective=objective, entropy_beta=0.1)
        out.loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        results[impl] = (out.loss.float(), out.step_losses.float(), grads)
    (loss_f, ce_f, grads_f), (loss_c, ce_c, grads_c) = results["fused"], results["chunked"]
    torch.testing.assert_close(loss_f, loss_c, atol=tol, rtol=tol)
    torch.testing.assert_close(ce_f, ce_c, atol=tol, rtol=tol)
    assert set(grads_f) == set(grads_c) and len(grads_f) > (2 if objective == "stage1" else 0)
    for name in grads_c:
        scale = grads_c[name].abs().max().clamp_min(1e-3)
        torch.testing.assert_close(grads_f[name] / scale, grads_c[name] / scale, atol=tol, rtol=tol, msg=name)


def test_fused_loss_under_autocast_with_hidden_states_in_another_dtype():
    """bf16 hidden states and an fp32 LM head under autocast (the loss writes its matmuls into
    preallocated blocks, which autocast does not cast): the loss and gradients are those of the
    plain formula in fp32 on the same (bf16-valued) hidden states, and each hidden state's gradient
    comes back in its own dtype."""
    from looplm.objectives import fused_exit_ce

    g = torch.Generator().manual_seed(0)
    n, d, V, T = 7, 16, 50, 3
    weight = (torch.randn(V, d, generator=g) * 0.3).requires_grad_()
    hiddens = [torch.randn(1, n, d, generator=g).bfloat16().requires_grad_() for _ in range(T)]
    targets = torch.randint(0, V, (1, n), generator=g)
    targets[0, 2] = -100
    p = torch.softmax(torch.randn(1, n, T, generator=g), -1).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = fused_exit_ce(hiddens, weight, targets, p, 6, chunk_size=3)
    loss.backward()
    ref_w, ref_h = weight.detach().clone().requires_grad_(), [h.detach().float().requires_grad_() for h in hiddens]
    ref_p = p.detach().clone().requires_grad_()
    ce = torch.stack([F.cross_entropy(h[0] @ ref_w.T, targets[0], reduction="none") for h in ref_h], -1)
    ((ref_p[0] * ce).sum() / 6).backward()
    torch.testing.assert_close(loss, (ref_p[0] * ce).sum().detach() / 6, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight.grad, ref_w.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p.grad, ref_p.grad, atol=1e-5, rtol=1e-5)
    for h, r in zip(hiddens, ref_h):
        assert h.grad.dtype == torch.bfloat16
        torch.testing.assert_close(h.grad.float(), r.grad, atol=1e-2, rtol=1e-2)
