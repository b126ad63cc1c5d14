"""The distillation divergences against explicit sums over a 3-token vocabulary written out by hand."""

import math

import pytest
import torch

from m1_align.distill.losses import token_divergence, token_mean

TEACHER = [2.0, 0.0, -1.0]
STUDENT = [0.0, 1.0, 0.5]


def softmax(logits, temperature=1.0):
    z = [math.exp(x / temperature) for x in logits]
    return [v / sum(z) for v in z]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def jsd(p, q, beta):
    m = [beta * a + (1 - beta) * b for a, b in zip(p, q, strict=True)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def one(logits):
    return torch.tensor([[logits]], dtype=torch.float64)  # [B=1, T=1, V=3]


def value(divergence, beta=0.5, temperature=1.0, student=STUDENT, teacher=TEACHER):
    return float(token_divergence(one(student), one(teacher), divergence, beta, temperature)[0, 0])


def test_the_three_divergences_equal_their_sums_written_out():
    p, q = softmax(TEACHER), softmax(STUDENT)
    # the numbers themselves: P = (0.8438, 0.1142, 0.0420), Q = (0.1863, 0.5065, 0.3072)
    assert p[0] == pytest.approx(0.84379, abs=1e-5) and q[1] == pytest.approx(0.50648, abs=1e-5)
    assert value("forward_kl") == pytest.approx(kl(p, q), rel=1e-12)
    assert value("reverse_kl") == pytest.approx(kl(q, p), rel=1e-12)
    assert kl(p, q) == pytest.approx(1.02080, abs=1e-5) and kl(q, p) == pytest.approx(1.08420, abs=1e-5)
    for beta in (0.1, 0.3, 0.5, 0.9):
        assert value("jsd", beta) == pytest.approx(jsd(p, q, beta), rel=1e-12)
    # the mixture is beta P + (1 - beta) Q with P the teacher: swapping the roles is 1 - beta
    assert value("jsd", 0.3) == pytest.approx(value("jsd", 0.7, student=TEACHER, teacher=STUDENT), rel=1e-12)
    assert value("jsd", 0.3) != pytest.approx(value("jsd", 0.7), rel=1e-3)
    assert value("jsd", 0.5) <= math.log(2)


def test_beta_0_and_1_are_the_kls_and_jsd_tends_to_them_once_scaled():
    p, q = softmax(TEACHER), softmax(STUDENT)
    assert value("jsd", 0.0) == value("forward_kl") and value("jsd", 1.0) == value("reverse_kl")
    eps = 1e-6  # JSD_beta ~ beta KL(P||Q) near 0 and (1 - beta) KL(Q||P) near 1
    assert value("jsd", eps) / eps == pytest.approx(kl(p, q), rel=1e-4)
    assert value("jsd", 1 - eps) / eps == pytest.approx(kl(q, p), rel=1e-4)


def test_temperature_divides_both_models_logits():
    p, q = softmax(TEACHER, 2.0), softmax(STUDENT, 2.0)
    assert value("forward_kl", temperature=2.0) == pytest.approx(kl(p, q), rel=1e-12)
    assert value("jsd", 0.4, temperature=2.0) == pytest.approx(jsd(p, q, 0.4), rel=1e-12)


def test_the_mask_keeps_positions_out_and_the_loss_is_their_token_mean():
    # [B=2, T=3]: the masked positions hold NaN logits, which must never reach the softmax
    student = torch.tensor([[STUDENT, TEACHER, [math.nan] * 3], [[0.0, 0.0, 0.0], [math.nan] * 3, STUDENT]],
                           dtype=torch.float64)
    teacher = torch.tensor([[TEACHER, STUDENT, [1.0, 2.0, 3.0]], [[1.0, 0.0, 0.0], [0.0] * 3, STUDENT]],
                           dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    per_token = token_divergence(student, teacher, "reverse_kl", mask=mask, chunk_tokens=1)
    loss = token_mean(per_token, mask)
    expected = [[kl(softmax(STUDENT), softmax(TEACHER)), kl(softmax(TEACHER), softmax(STUDENT)), 0.0],
                [kl(softmax([0, 0, 0]), softmax([1, 0, 0])), 0.0, 0.0]]
    assert torch.allclose(per_token, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert float(loss) == pytest.approx(sum(map(sum, expected)) / 4, rel=1e-12)
    # gradient accumulation: the count of the whole batch divides instead
    assert float(token_mean(per_token, mask, num_tokens=8)) == pytest.approx(
        sum(map(sum, expected)) / 8, rel=1e-12)
    # nothing scored: a zero loss that still backpropagates
    empty = student.nan_to_num().requires_grad_()
    nothing = torch.zeros(2, 3, dtype=torch.bool)
    zero = token_mean(token_divergence(empty, teacher, mask=nothing), nothing)
    zero.backward()
    assert float(zero.detach()) == 0.0 and not empty.grad.any()


def test_forward_kl_gradient_is_q_minus_p_and_chunks_change_nothing():
    torch.manual_seed(0)
    student = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 5) > 0.3
    per_token = token_divergence(student, teacher, "forward_kl", mask=mask, chunk_tokens=2)
    per_token.sum().backward()
    # d KL(P || softmax(z)) / dz = Q - P, at scored positions only; the teacher gets no gradient
    expected = (student.softmax(-1) - teacher.softmax(-1)).detach() * mask[..., None]
    assert torch.allclose(student.grad, expected, atol=1e-12)
    assert teacher.grad is None

    for divergence in ("reverse_kl", "jsd"):
        grads = []
        for chunk in (1, 3, None):
            student.grad = None
            out = token_divergence(student, teacher, divergence, 0.3, 1.5, mask, chunk_tokens=chunk)
            (out * torch.arange(5)).sum().backward()
            grads.append((out.detach(), student.grad.clone()))
        for out, grad in grads[1:]:
            assert torch.allclose(out, grads[0][0], atol=1e-12) and torch.allclose(grad, grads[0][1], atol=1e-12)


def test_a_minus_infinity_logit_is_a_zero_probability_not_a_nan():
    student = torch.tensor([[[0.0, 1.0, -math.inf]]])
    teacher = torch.tensor([[[0.5, 0.0, -math.inf]]])
    p, q = softmax([0.5, 0.0]), softmax([0.0, 1.0])
    assert float(token_divergence(student, teacher, "forward_kl")[0, 0]) == pytest.approx(kl(p, q), rel=1e-6)
    assert float(token_divergence(student, teacher, "jsd", 0.5)[0, 0]) == pytest.approx(jsd(p, q, 0.5), rel=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"divergence": "kl"}, "divergence 'kl' is not one of forward_kl, reverse_kl, jsd"),
    ({"divergence": "jsd", "beta": 1.5}, r"beta 1.5 is outside \[0, 1\]"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"teacher_vocab": 4}, r"student logits \(1, 2, 3\) and teacher logits \(1, 2, 4\) differ"),
    ({"mask": torch.ones(1, 3, dtype=torch.bool)}, r"mask \(1, 3\) does not match"),
])
def test_bad_arguments_are_refused_by_name(kwargs, message):
    teacher = torch.zeros(1, 2, kwargs.pop("teacher_vocab", 3))
    with pytest.raises(ValueError, match=message):
        token_divergence(torch.zeros(1, 2, 3), teacher, **kwargs)
