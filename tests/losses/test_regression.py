import numpy as np
import pytest
import torch

from groupdir.losses import label_weights, regression_loss
from groupdir.losses.regression import lds_kernel

LABELS = np.array([0] * 1 + [1] * 10 + [2] * 100 + [3] * 2000)


def test_regression_losses_and_weights():
    pred, target = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])
    assert regression_loss(pred, target, "l1").item() == pytest.approx(1.5)
    assert regression_loss(pred, target, "mse").item() == pytest.approx(2.5)
    assert regression_loss(pred, target, "l1", torch.tensor([2.0, 0.0])).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown regression loss"):
        regression_loss(pred, target, "huber")


def test_inverse_weights_clip_counts_and_have_mean_one():
    weigh = label_weights(LABELS, "inverse")
    weights = weigh(LABELS)
    assert weights.mean() == pytest.approx(1.0, rel=1e-5)
    w0, w1, w2, w3 = weigh([0, 1, 2, 3])
    assert w0 == pytest.approx(w1 * 10 / 5)  # label 0's count 1 is clipped up to 5
    assert w2 / w3 == pytest.approx(1000 / 100)  # label 3's count 2000 is clipped down to 1000


def test_sqrt_inverse_and_lds_by_hand():
    plain = label_weights(LABELS, "sqrt_inv")([0, 1, 2, 3])
    assert plain[0] / plain[1] == pytest.approx(np.sqrt(10))
    # sqrt counts [1, 3.162, 10, 44.72] convolved with triang(3) = [0.5, 1, 0.5] (zero outside):
    smoothed_counts = np.array([1 + 0.5 * np.sqrt(10), np.sqrt(10) + 0.5 * (1 + 10),
                                10 + 0.5 * (np.sqrt(10) + np.sqrt(2000)), np.sqrt(2000) + 0.5 * 10])
    weigh = label_weights(LABELS, "sqrt_inv", lds=True, kernel="triang", kernel_size=3)
    weights = weigh([0, 1, 2, 3])
    np.testing.assert_allclose(weights / weights[0], smoothed_counts[0] / smoothed_counts, rtol=1e-5)
    assert weigh(LABELS).mean() == pytest.approx(1.0, rel=1e-5)
    assert label_weights(LABELS, "none") is None


@pytest.mark.parametrize("kind", ["gaussian", "triang", "laplace"])
def test_lds_kernels_are_symmetric_with_peak_one(kind):
    window = lds_kernel(kind, 5, 2.0)
    assert len(window) == 5 and window.max() == pytest.approx(1.0) and window[2] == pytest.approx(1.0)
    np.testing.assert_allclose(window, window[::-1])
    assert (np.diff(window[:3]) > 0).all()
