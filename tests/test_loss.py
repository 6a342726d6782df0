"""Pins the baking objective against slow, obviously-correct references on seeded tensors."""

import math

import pytest
import torch

from promptbake.loss import full_kl, log1mexp, teacher_topk, topk_kl_with_tail


def reference_topk_tail_kl(student_logits, teacher_logits, k):
    """Slow reference: per position, coarsen both distributions to {top-K ids of p, rest} in float64."""
    total, n = 0.0, 0
    for s, t in zip(student_logits.double().reshape(-1, student_logits.shape[-1]),
                    teacher_logits.double().reshape(-1, teacher_logits.shape[-1])):
        p, q = t.softmax(-1), s.softmax(-1)
        ids = p.topk(k).indices
        pk, qk = p[ids], q[ids]
        pc = torch.cat([pk, (1 - pk.sum()).clamp(min=0).view(1)])
        qc = torch.cat([qk, (1 - qk.sum()).clamp(min=0).view(1)])
        terms = [pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(pc.tolist(), qc.tolist()) if pi > 0]
        total += sum(terms)
        n += 1
    return total / n


def seeded(v=50, n=12, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale


@pytest.mark.parametrize("k", [1, 5, 20, 49])
def test_matches_slow_reference(k):
    student, teacher = seeded()
    ids, lp = teacher_topk(teacher, k)
    got = topk_kl_with_tail(student, ids, lp, torch.ones(student.shape[0]))
    assert got.item() == pytest.approx(reference_topk_tail_kl(student, teacher, k), rel=1e-4, abs=1e-6)


def test_k_equal_vocab_is_full_kl():
    student, teacher = seeded(v=64)
    ids, lp = teacher_topk(teacher, 64)
    mask = torch.ones(student.shape[0])
    assert topk_kl_with_tail(student, ids, lp, mask).item() == pytest.approx(
        full_kl(teacher, student, mask).item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_bounded_by_zero_and_full_kl(seed):
    student, teacher = seeded(v=100, seed=seed)
    mask = torch.ones(student.shape[0])
    full = full_kl(teacher, student, mask).item()
    for k in (1, 3, 10, 50, 99):
        ids, lp = teacher_topk(teacher, k)
        got = topk_kl_with_tail(student, ids, lp, mask).item()
        assert -1e-6 <= got <= full + 1e-5


def test_zero_when_student_equals_teacher():
    _, teacher = seeded()
    ids, lp = teacher_topk(teacher, 10)
    assert topk_kl_with_tail(teacher.clone(), ids, lp, torch.ones(teacher.shape[0])).item() == pytest.approx(0, abs=1e-6)


def test_mask_averages_over_valid_tokens_only():
    student, teacher = seeded(n=6)
    ids, lp = teacher_topk(teacher, 8)
    mask = torch.tensor([1, 1, 0, 1, 0, 0.0])
    got = topk_kl_with_tail(student, ids, lp, mask)
    keep = mask.bool()
    want = topk_kl_with_tail(student[keep], ids[keep], lp[keep], torch.ones(int(keep.sum())))
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_fp16_teacher_logprobs_as_stored():
    student, teacher = seeded()
    ids, lp = teacher_topk(teacher, 20)
    a = topk_kl_with_tail(student, ids, lp, torch.ones(12))
    b = topk_kl_with_tail(student, ids.to(torch.int32), lp.half(), torch.ones(12))
    assert b.item() == pytest.approx(a.item(), rel=2e-3, abs=1e-4)


def fit_toy_student(loss_fn, v: int = 30, k: int = 5):
    """Adam on free student logits against a seeded teacher's top-K; returns (teacher, ids, logprobs, student)."""
    torch.manual_seed(0)
    teacher = torch.randn(4, v)
    ids, lp = teacher_topk(teacher, k)
    student = torch.zeros(4, v, requires_grad=True)
    opt = torch.optim.Adam([student], lr=0.1)
    for _ in range(1500):
        opt.zero_grad()
        loss_fn(student, ids, lp, torch.ones(4)).backward()
        opt.step()
    return teacher, ids, lp, student.detach()


def test_gradient_drives_toy_student_to_teacher_not_sharpened():
    """Minimising the top-K+tail loss recovers the teacher's top-K probabilities and tail mass, whereas
    the tail-less sum would pile all mass onto the K ids."""
    teacher, ids, lp, student = fit_toy_student(topk_kl_with_tail)
    q = student.softmax(-1)
    p = teacher.softmax(-1)
    assert torch.allclose(q.gather(-1, ids), p.gather(-1, ids), atol=2e-3)
    p_tail = 1 - p.gather(-1, ids).sum(-1)
    assert torch.allclose(1 - q.gather(-1, ids).sum(-1), p_tail, atol=2e-3)
    assert (p_tail > 0.2).all()  # the teacher has real tail mass, so this test can tell sharpening apart


def test_tailless_sum_would_sharpen():
    """Documents the peers' bug this loss avoids: without the tail, putting all mass on the top-K scores lower."""
    teacher = torch.randn(4, 30, generator=torch.Generator().manual_seed(7)) * 2
    ids, lp = teacher_topk(teacher, 5)
    p = lp.exp()

    def tailless(student):
        log_q = student.log_softmax(-1).gather(-1, ids)
        return (p * (lp - log_q)).sum()

    sharpened = torch.full((4, 30), -30.0).scatter(-1, ids, lp)
    assert tailless(sharpened) < tailless(teacher)
    assert topk_kl_with_tail(sharpened, ids, lp, torch.ones(4)) > topk_kl_with_tail(teacher, ids, lp, torch.ones(4))


def test_log1mexp_stable():
    x = torch.tensor([-1e-10, -1e-3, -0.5, -1.0, -20.0, -100.0], dtype=torch.float32)
    want = torch.log1p(-torch.exp(x.double())).float()
    got = log1mexp(x)
    assert torch.isfinite(got).all()
    assert torch.allclose(got[1:], want[1:], rtol=1e-5)


def test_log_probs_at_gradient_is_exact():
    from promptbake.loss import _LogProbsAt

    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(4, 7, 30, generator=g, dtype=torch.float64) * 3).requires_grad_()
    ids = torch.randint(0, 30, (4, 7, 5), generator=g)
    assert torch.autograd.gradcheck(lambda z: _LogProbsAt.apply(z, ids), (logits,))
    torch.testing.assert_close(_LogProbsAt.apply(logits, ids), torch.log_softmax(logits, -1).gather(-1, ids))


def test_loss_gradient_equals_plain_autograd():
    """The fused backward gives the gradient autograd gives for the same formula written plainly."""
    student, teacher = seeded(v=80, seed=4)
    ids, lp = teacher_topk(teacher, 10)
    mask = (torch.arange(12) % 3 != 0).float()
    a = student.clone().requires_grad_()
    topk_kl_with_tail(a, ids, lp, mask).backward()
    b = student.double().requires_grad_()
    log_q = torch.log_softmax(b, -1).gather(-1, ids)
    p = lp.double().exp()
    p_tail, q_tail = 1 - p.sum(-1), 1 - log_q.exp().sum(-1)
    per_token = (p * (lp.double() - log_q)).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
    ((per_token * mask).sum() / mask.sum()).backward()
    torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-6, rtol=1e-4)


def test_chunked_head_loss_equals_plain_in_value_and_gradient():
    """head_topk_kl_with_tail never holds [N, V] logits; it must give the plain loss and its gradient."""
    from promptbake.loss import head_topk_kl_with_tail

    g = torch.Generator().manual_seed(5)
    head = torch.nn.Linear(16, 90, bias=False).requires_grad_(False)
    torch.nn.init.normal_(head.weight, std=0.5, generator=g)
    hidden = torch.randn(13, 16, generator=g)
    ids, lp = teacher_topk(torch.randn(13, 90, generator=g) * 3, 7)
    a, b = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    chunked = head_topk_kl_with_tail(a, head, ids, lp, chunk=5)
    plain = topk_kl_with_tail(head(b), ids, lp, torch.ones(13))
    (2 * chunked).backward()
    (2 * plain).backward()
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4)
    with torch.inference_mode():
        assert head_topk_kl_with_tail(hidden, head, ids, lp, chunk=4).item() == pytest.approx(plain.item(), rel=1e-5)


# ---------------------------------------------------------------- on-policy divergences (reverse KL, generalised JSD)
def reference_coarse_divergence(student_logits, teacher_logits, k, beta):
    """Slow reference: per position, both distributions coarsened in float64 to {the teacher's top-K ids, rest},
    then reverse KL (beta 1), forward KL (beta 0) or beta KL(P||M) + (1-beta) KL(Q||M), M = beta P + (1-beta) Q."""
    def kl(a, b):
        return sum(ai * (math.log(ai) - math.log(bi)) for ai, bi in zip(a, b) if ai > 0)

    total, n = 0.0, 0
    for s, t in zip(student_logits.double().reshape(-1, student_logits.shape[-1]),
                    teacher_logits.double().reshape(-1, teacher_logits.shape[-1])):
        p, q = t.softmax(-1), s.softmax(-1)
        ids = p.topk(k).indices
        pc = p[ids].tolist() + [max(1 - p[ids].sum().item(), 0.0)]
        qc = q[ids].tolist() + [max(1 - q[ids].sum().item(), 0.0)]
        if beta == 1:
            total += kl(qc, pc)
        elif beta == 0:
            total += kl(pc, qc)
        else:
            m = [beta * a + (1 - beta) * b for a, b in zip(pc, qc)]
            total += beta * kl(pc, m) + (1 - beta) * kl(qc, m)
        n += 1
    return total / n


@pytest.mark.parametrize("beta", [1.0, 0.5, 0.1, 0.0])
@pytest.mark.parametrize("k", [1, 5, 20, 40])
def test_coarse_divergence_matches_slow_reference(k, beta):
    # Not K = V - 1: there the teacher's tail is one token of ~1e-5, and 1 - Σp from float32 log-probs
    # carries ~1% relative error, which the reverse KL weights by the student's (larger) tail mass.
    from promptbake.loss import topk_divergence

    student, teacher = seeded(seed=7)
    ids, lp = teacher_topk(teacher, k)
    got = topk_divergence(student, ids, lp, torch.ones(student.shape[0]), beta)
    assert got.item() == pytest.approx(reference_coarse_divergence(student, teacher, k, beta), rel=1e-4, abs=1e-6)


def test_forward_kl_beta_zero_is_the_offpolicy_loss():
    from promptbake.loss import topk_divergence

    student, teacher = seeded(seed=8)
    ids, lp = teacher_topk(teacher, 10)
    mask = torch.ones(student.shape[0])
    assert topk_divergence(student, ids, lp, mask, beta=0.0).item() == pytest.approx(
        topk_kl_with_tail(student, ids, lp, mask).item(), rel=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_reverse_kl_bounded_by_zero_and_full_reverse_kl(seed):
    """Coarsening never increases a divergence; at K = V nothing is coarsened."""
    from promptbake.loss import topk_divergence

    student, teacher = seeded(v=100, seed=seed)
    mask = torch.ones(student.shape[0])
    full_reverse = full_kl(student, teacher, mask).item()  # KL(q || p): the student's logits in the first slot
    for k in (1, 3, 10, 50, 99):
        ids, lp = teacher_topk(teacher, k)
        # fp32 sums in a thread-count-dependent order: a relative tolerance, as for K = V below
        assert -1e-6 <= topk_divergence(student, ids, lp, mask).item() <= full_reverse * (1 + 1e-4) + 1e-6
    ids, lp = teacher_topk(teacher, 100)
    assert topk_divergence(student, ids, lp, mask).item() == pytest.approx(full_reverse, rel=1e-4)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_coarse_divergence_zero_when_student_equals_teacher(beta):
    from promptbake.loss import topk_divergence

    _, teacher = seeded()
    ids, lp = teacher_topk(teacher, 10)
    assert topk_divergence(teacher.clone(), ids, lp, torch.ones(12), beta).item() == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("beta", [1.0, 0.5, 0.0])
def test_coarse_divergence_gradient_equals_plain_float64_autograd(beta):
    """The fused log-prob backward and the clamped tail give the gradient of the formula written plainly."""
    from promptbake.loss import topk_divergence

    student, teacher = seeded(v=80, seed=9)
    ids, lp = teacher_topk(teacher, 10)
    mask = (torch.arange(12) % 4 != 0).float()
    a = student.clone().requires_grad_()
    topk_divergence(a, ids, lp, mask, beta).backward()
    b = student.double().requires_grad_()
    log_q = torch.log_softmax(b, -1).gather(-1, ids)
    pc = torch.cat([lp.double().exp(), 1 - lp.double().exp().sum(-1, keepdim=True)], -1)
    qc = torch.cat([log_q.exp(), 1 - log_q.exp().sum(-1, keepdim=True)], -1)

    def kl(x, y):
        return (x * (x.log() - y.log())).sum(-1)

    if beta == 1:
        per_token = kl(qc, pc)
    elif beta == 0:
        per_token = kl(pc, qc)
    else:
        m = beta * pc + (1 - beta) * qc
        per_token = beta * kl(pc, m) + (1 - beta) * kl(qc, m)
    ((per_token * mask).sum() / mask.sum()).backward()
    torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-6, rtol=1e-4)


def test_coarse_divergence_gradcheck_float64():
    from promptbake.loss import coarse_divergence_per_token

    g = torch.Generator().manual_seed(11)
    logits = (torch.randn(5, 40, generator=g, dtype=torch.float64) * 2).requires_grad_()
    teacher = torch.randn(5, 40, generator=g, dtype=torch.float64) * 2
    lp, ids = torch.log_softmax(teacher, -1).topk(6, dim=-1)
    for beta in (1.0, 0.3, 0.0):
        assert torch.autograd.gradcheck(
            lambda z, beta=beta: coarse_divergence_per_token(torch.log_softmax(z, -1).gather(-1, ids), lp, beta).double(),
            (logits,))


def test_reverse_kl_drives_toy_student_to_the_coarsened_teacher():
    """Minimising the coarse reverse KL matches the teacher's top-K probabilities and its tail mass (no sharpening)."""
    from promptbake.loss import topk_divergence

    teacher, ids, lp, student = fit_toy_student(topk_divergence)
    q, p = student.softmax(-1), teacher.softmax(-1)
    assert torch.allclose(q.gather(-1, ids), p.gather(-1, ids), atol=2e-3)
    p_tail = 1 - p.gather(-1, ids).sum(-1)
    assert torch.allclose(1 - q.gather(-1, ids).sum(-1), p_tail, atol=2e-3)
    assert (p_tail > 0.2).all()


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_chunked_head_divergence_equals_plain_in_value_and_gradient(beta):
    from promptbake.loss import head_topk_divergence, topk_divergence

    g = torch.Generator().manual_seed(12)
    head = torch.nn.Linear(16, 90, bias=False).requires_grad_(False)
    torch.nn.init.normal_(head.weight, std=0.5, generator=g)
    hidden = torch.randn(13, 16, generator=g)
    ids, lp = teacher_topk(torch.randn(13, 90, generator=g) * 3, 7)
    a, b = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    chunked = head_topk_divergence(a, head, ids, lp, beta, chunk=5)
    plain = topk_divergence(head(b), ids, lp, torch.ones(13), beta)
    (3 * chunked).backward()
    (3 * plain).backward()
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4)
    with torch.inference_mode():
        assert head_topk_divergence(hidden, head, ids, lp, beta, chunk=4).item() == pytest.approx(plain.item(), rel=1e-5)
