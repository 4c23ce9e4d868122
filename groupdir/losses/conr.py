"""ConR, the contrastive regularizer of Keramati et al. (ICLR 2024).

The batch holds two augmented views of B samples, N = 2B rows (labels repeated). Each row j is an
anchor; with w the similarity threshold on labels and predictions,

    K_j^+ = {i != j : |y_i - y_j| <= w}                                  positives
    K_j^- = {q : |y_q - y_j| > w  and  |yhat_q - yhat_j| <= w}           negatives

negatives being samples the model predicts close to the anchor although their labels are far. With
unit features z and temperature t,

    L_j = w_j * 1/|K_j^+| * sum_{i in K_j^+} -log( exp(z_j.z_i/t) / D_j ),
    D_j = sum_{p in K_j^+} exp(z_j.z_p/t) + sum_{q in K_j^-} S_jq exp(z_j.z_q/t),
    S_jq = w_j * exp(e * |y_j - y_q|),

and L = 1/N sum_j L_j, where L_j = 0 when K_j^- is empty (the sample is not an anchor) and also,
here, when K_j^+ is empty (impossible with two views, whose twin is always a positive). w_j is the
anchor's label weight (1 without re-weighting) and e the pushing power: rarer anchors and farther
labels push harder.

This follows the reference code (BorealisAI/ConR, `ConR` in agedb-dir/loss.py and
imdb-wiki-dir/loss.py), which produced the paper's numbers, with one fix: the code masks the logits
by multiplication before exp, so its denominator also adds exp(0) = 1 for every entry of the row that
is not a positive (the anchor itself, the negatives, every other sample): a constant of about N that
the paper's denominator (positives and pushed negatives) does not have. The AgeDB code overwrites
its temperature argument with t = 0.07 inside the function (its -t says 0.2); the IMDB-WIKI code's
-t defaults to 0.07: 0.07 is the default here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conr_loss(features: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor,
              weights: torch.Tensor | None = None, threshold: float = 1.0, temperature: float = 0.07,
              pushing_power: float = 0.01) -> torch.Tensor:
    """Scalar ConR loss of features (N, D), labels (N,), predictions (N,), label weights (N,) or None.

    Predictions only choose the negatives, so no gradient flows through them.
    """
    _check(features, labels, preds, weights, temperature)
    if features.dtype in (torch.float16, torch.bfloat16):
        features = features.float()  # exp of logits up to 1/t is too coarse in half precision
    z = F.normalize(features, dim=1)
    logits = z @ z.T / temperature
    positive, negative = _pairs(labels.to(logits.dtype), preds.detach().to(logits.dtype), threshold)
    anchor_weight = torch.ones_like(logits[:, 0]) if weights is None else weights.to(logits.dtype)
    label_distance = (labels[:, None] - labels[None, :]).abs().to(logits.dtype)
    pushing = anchor_weight[:, None] * torch.exp(pushing_power * label_distance)

    active = negative.any(dim=1) & positive.any(dim=1)
    # A per-row shift over the entries that enter the loss keeps exp() in range; it cancels in L_j.
    row_max = logits.masked_fill(~(positive | negative), float("-inf")).amax(dim=1, keepdim=True)
    shifted = logits - torch.where(active[:, None], row_max, torch.zeros_like(row_max)).detach()
    exp = shifted.exp()
    denominator = (exp * positive).sum(dim=1) + (exp * pushing * negative).sum(dim=1)
    # -log(exp(s_ji) / D_j) averaged over the positives i: log D_j - the positives' mean logit.
    # Rows that are not anchors take log(1): a log(0) there would poison the gradient.
    log_denominator = torch.log(torch.where(active, denominator, torch.ones_like(denominator)))
    mean_positive = (shifted * positive).sum(dim=1) / positive.sum(dim=1).clamp_min(1)
    per_anchor = torch.where(active, anchor_weight * (log_denominator - mean_positive), torch.zeros_like(denominator))
    return per_anchor.sum() / len(features)


def _pairs(labels: torch.Tensor, preds: torch.Tensor,
           threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (N, N) masks of positives (self excluded) and negatives of each anchor row."""
    label_close = (labels[:, None] - labels[None, :]).abs() <= threshold
    pred_close = (preds[:, None] - preds[None, :]).abs() <= threshold
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return label_close & ~eye, ~label_close & pred_close


def _check(features: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor,
           weights: torch.Tensor | None, temperature: float) -> None:
    if features.dim() != 2:
        raise ValueError(f"expected features of shape (N, D), got {tuple(features.shape)}")
    expected = (features.shape[0],)
    for name, tensor in (("labels", labels), ("preds", preds), ("weights", weights)):
        if tensor is not None and tensor.shape != expected:
            raise ValueError(f"expected {name} of shape {expected}, got {tuple(tensor.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
