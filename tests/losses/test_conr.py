import math

import torch

from groupdir.losses.conr import conr_loss


def literal_conr(features, labels, preds, weights, threshold, temperature, pushing_power):
    """ConR's equation (groupdir/losses/conr.py) with loops over anchors, positives and negatives;
    also counts the anchors."""
    z = features / features.norm(dim=1, keepdim=True)
    n = len(z)
    total, anchors = features.new_zeros(()), 0
    for j in range(n):
        positives = [i for i in range(n) if i != j and abs(labels[i] - labels[j]) <= threshold]
        negatives = [q for q in range(n) if abs(labels[q] - labels[j]) > threshold
                     and abs(preds[q] - preds[j]) <= threshold]
        if not negatives or not positives:
            continue
        anchors += 1
        w_j = 1.0 if weights is None else weights[j]
        denominator = sum(torch.exp(z[j] @ z[p] / temperature) for p in positives)
        for q in negatives:
            push = w_j * math.exp(pushing_power * abs(float(labels[j] - labels[q])))
            denominator = denominator + push * torch.exp(z[j] @ z[q] / temperature)
        logs = sum(-torch.log(torch.exp(z[j] @ z[i] / temperature) / denominator) for i in positives)
        total = total + w_j * logs / len(positives)
    return total / n, anchors


def value_and_grad(loss_fn, features, *args):
    features = features.clone().requires_grad_(True)
    loss = loss_fn(features, *args)
    loss = loss[0] if isinstance(loss, tuple) else loss
    (grad,) = torch.autograd.grad(loss, features)
    return loss.detach(), grad


def two_view_batch():
    """B = 4 samples, two views: a tie in labels, and a sample (label 1.5) predicted far from all."""
    labels = torch.tensor([0.0, 0.0, 1.5, 3.0], dtype=torch.float64).repeat(2)
    preds = torch.tensor([0.2, 0.4, 10.0, 0.9, 0.1, 0.5, 10.3, 1.0], dtype=torch.float64)
    features = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return features, labels, preds


def test_matches_literal_equation_in_value_and_gradient():
    features, labels, preds = two_view_batch()
    weights = torch.tensor([0.5, 0.5, 2.0, 3.0], dtype=torch.float64).repeat(2)
    args = (labels, preds, weights, 1.0, 0.3, 0.2)
    fast, fast_grad = value_and_grad(conr_loss, features, *args)
    slow, slow_grad = value_and_grad(literal_conr, features, *args)
    _, anchors = literal_conr(features, *args)
    assert 0 < anchors < len(features)  # the label-1.5 views have no negatives, others do
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-10, atol=1e-12)
    assert fast > 0 and fast_grad.abs().sum() > 0
    # the label-1.5 views are only each other's positives and no one's negatives: no gradient
    assert torch.equal(fast_grad[[2, 6]], torch.zeros_like(fast_grad[[2, 6]]))


def test_matches_literal_equation_at_float32_and_default_arguments():
    features, labels, preds = two_view_batch()
    fast = conr_loss(features.float(), labels.float(), preds.float())
    slow, _ = literal_conr(features, labels, preds, None, 1.0, 0.07, 0.01)
    torch.testing.assert_close(fast.double(), slow, rtol=1e-5, atol=1e-6)


def test_hand_computed_case():
    # rows: z0 = (1, 0) and z1 = (0, 1) share label 0; z2 = (1, 0) has label 5 but a close prediction.
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0.0, 0.0, 5.0], dtype=torch.float64)
    preds = torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64)
    push = math.exp(0.1 * 5)
    # anchor 0: positive 1 (cos 0), negative 2 (cos 1); anchor 1: positive 0, negative 2 (cos 0);
    # sample 2 has no positive, so it contributes nothing.
    expected = (math.log(1 + push * math.e) + math.log(1 + push)) / 3
    loss = conr_loss(features, labels, preds, threshold=1.0, temperature=1.0, pushing_power=0.1)
    assert math.isclose(float(loss), expected, rel_tol=1e-12)
    weighted = conr_loss(features, labels, preds, torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64),
                         threshold=1.0, temperature=1.0, pushing_power=0.1)
    # the weight scales anchor 0's push and its loss alike
    assert math.isclose(float(weighted), (2 * math.log(1 + 2 * push * math.e) + math.log(1 + push)) / 3,
                        rel_tol=1e-12)


def test_mean_of_logs_over_positives():
    # anchor 0 has two positives at cos 0 and -1 and one negative at cos 1 (e = 0: S = 1).
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0.0, 0.0, 0.0, 5.0], dtype=torch.float64)
    preds = torch.zeros(4, dtype=torch.float64)
    e = math.e
    row0 = math.log(1 + 1 / e + e) + 0.5  # mean of (log D - 0) and (log D + 1)
    row1 = math.log(3.0)
    row2 = math.log(1 + 2 / e) + 0.5
    loss = conr_loss(features, labels, preds, threshold=1.0, temperature=1.0, pushing_power=0.0)
    assert math.isclose(float(loss), (row0 + row1 + row2) / 4, rel_tol=1e-12)


def test_zero_without_negatives_and_gradient_stays_finite():
    features, labels, _ = two_view_batch()
    preds = labels * 10  # predictions as far apart as the labels: no negatives anywhere
    loss, grad = value_and_grad(conr_loss, features, labels, preds)
    assert loss == 0
    assert torch.equal(grad, torch.zeros_like(grad))


def test_weights_scale_the_push_and_the_anchors_loss():
    features, labels, preds = two_view_batch()
    unweighted = conr_loss(features, labels, preds)
    ones = conr_loss(features, labels, preds, torch.ones(8, dtype=torch.float64))
    assert torch.equal(unweighted, ones)
    heavier = conr_loss(features, labels, preds, torch.full((8,), 3.0, dtype=torch.float64))
    assert heavier > 3 * unweighted  # a 3x anchor weight, and its negatives pushed harder on top
    threes = torch.full((8,), 3.0, dtype=torch.float64)
    slow, _ = literal_conr(features, labels, preds, threes, 1.0, 0.07, 0.01)
    torch.testing.assert_close(heavier, slow, rtol=1e-12, atol=1e-12)


def test_predictions_get_no_gradient():
    features, labels, preds = two_view_batch()
    preds = preds.clone().requires_grad_(True)
    loss = conr_loss(features, labels, preds)
    assert not loss.requires_grad or torch.autograd.grad(loss, preds, allow_unused=True)[0] is None
