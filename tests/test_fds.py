import numpy as np
import torch

from groupdir.fds import FeatureSmoothing
from groupdir.losses.regression import lds_kernel

DIM, FIRST_BIN, NUM_BINS = 3, 2, 6
WINDOW = lds_kernel("gaussian", 5, 1.0)


def make_module(**kwargs) -> FeatureSmoothing:
    options = dict(feature_dim=DIM, first_bin=FIRST_BIN, num_bins=NUM_BINS, bin_width=1.0, window=WINDOW)
    return FeatureSmoothing(**{**options, **kwargs}).double()


def epoch_data(seed: int, size: int = 60):
    """Labels spanning past both ends of the bin range (0..9 against bins 2..7), every bin seen twice+."""
    generator = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(0.0, 10.0), np.arange(2.0, 8.0), generator.uniform(0, 10, size - 16)])
    features = generator.normal(size=(size, DIM)) * (1 + labels[:, None]) + labels[:, None]
    return features, labels


def expected_bins(labels):
    return np.clip(np.floor(labels + 1e-9).astype(int) - FIRST_BIN, 0, NUM_BINS - 1)


def per_bin_stats(features, labels):
    """Per-bin mean and unbiased variance; zeros for an empty bin."""
    bins = expected_bins(labels)
    groups = [features[bins == b] if (bins == b).sum() > 1 else np.zeros((2, DIM))
              for b in range(NUM_BINS)]
    return np.stack([g.mean(axis=0) for g in groups]), np.stack([g.var(axis=0, ddof=1) for g in groups])


def run_epoch(module, features, labels, batches=3, all_reduce=None):
    for part_x, part_y in zip(np.array_split(features, batches), np.array_split(labels, batches)):
        module(torch.from_numpy(part_x), torch.from_numpy(part_y))
    module.end_epoch(all_reduce)


def reflect_smooth(stats):
    half = len(WINDOW) // 2
    padded = np.pad(stats, ((half, half), (0, 0)), mode="reflect")
    window = WINDOW / WINDOW.sum()
    return np.stack([np.convolve(padded[:, d], window, mode="valid") for d in range(stats.shape[1])], axis=1)


def test_first_epoch_running_stats_are_per_bin_mean_and_unbiased_var():
    module = make_module()
    features, labels = epoch_data(0)
    run_epoch(module, features, labels)
    mean, var = per_bin_stats(features, labels)
    np.testing.assert_allclose(module.running_mean.numpy(), mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(module.running_var.numpy(), var, rtol=1e-9, atol=1e-12)
    assert int(module.epochs_done) == 1
    assert module._count.sum() == 0 and module._sum.abs().sum() == 0  # accumulators zeroed


def test_second_epoch_applies_momentum_and_unseen_bins_keep_their_stats():
    module = make_module(momentum=0.7)
    first_x, first_y = epoch_data(1)
    run_epoch(module, first_x, first_y)
    second_x, second_y = epoch_data(2)
    keep = expected_bins(second_y) != 4  # bin 4 unseen in the second epoch
    run_epoch(module, second_x[keep], second_y[keep])
    mean1, var1 = per_bin_stats(first_x, first_y)
    mean2, var2 = per_bin_stats(second_x[keep], second_y[keep])  # bin 4 empty
    expected_mean = np.where(np.arange(NUM_BINS)[:, None] == 4, mean1, 0.3 * mean2 + 0.7 * mean1)
    expected_var = np.where(np.arange(NUM_BINS)[:, None] == 4, var1, 0.3 * var2 + 0.7 * var1)
    np.testing.assert_allclose(module.running_mean.numpy(), expected_mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(module.running_var.numpy(), expected_var, rtol=1e-9, atol=1e-12)


def test_single_sample_bin_has_zero_variance_not_nan():
    module = make_module()
    features, labels = epoch_data(3)
    bins = expected_bins(labels)
    only = np.argmax(bins == 1)  # keep one sample of bin 1
    keep = (bins != 1) | (np.arange(len(labels)) == only)
    run_epoch(module, features[keep], labels[keep])
    np.testing.assert_array_equal(module.running_var[1].numpy(), np.zeros(DIM))
    np.testing.assert_allclose(module.running_mean[1].numpy(), features[only])


def test_smoothed_stats_are_reflect_padded_convolution_of_running_stats():
    module = make_module()
    features, labels = epoch_data(4)
    run_epoch(module, features, labels)
    mean, var = per_bin_stats(features, labels)
    np.testing.assert_allclose(module.smoothed_mean.numpy(), reflect_smooth(mean), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(module.smoothed_var.numpy(), reflect_smooth(var), rtol=1e-9, atol=1e-12)
    assert not np.allclose(reflect_smooth(mean), mean)  # the smoothing did something
    np.testing.assert_array_equal(module.last_epoch_mean.numpy(), module.running_mean.numpy())
    np.testing.assert_array_equal(module.last_epoch_var.numpy(), module.running_var.numpy())


def test_calibration_equals_formula_per_sample_with_clip_and_edge_bins():
    module = make_module(clip=(0.5, 2.0))
    features, labels = epoch_data(5)
    run_epoch(module, features, labels)
    # a zero-variance dimension (left alone) in bin 3, and a bin whose variances all vanish
    module.last_epoch_var[3, 1] = 0.0
    module.last_epoch_var[5] = 0.0
    test_x, test_y = epoch_data(6, size=40)
    out = module(torch.from_numpy(test_x), torch.from_numpy(test_y)).numpy()
    m1, v1 = module.last_epoch_mean.numpy(), module.last_epoch_var.numpy()
    m2, v2 = module.smoothed_mean.numpy(), module.smoothed_var.numpy()
    clipped = 0
    for k, (z, b) in enumerate(zip(test_x, expected_bins(test_y))):
        for d in range(DIM):
            if v1[b].sum() < 1e-10 or v1[b, d] == 0:
                expected = z[d]
            else:
                ratio = v2[b, d] / v1[b, d]
                clipped += not 0.5 <= ratio <= 2.0
                expected = (z[d] - m1[b, d]) * np.sqrt(np.clip(ratio, 0.5, 2.0)) + m2[b, d]
            assert np.isclose(out[k, d], expected, rtol=1e-12, atol=1e-12), (k, d)
    assert clipped > 0  # the clip was exercised
    assert {0, NUM_BINS - 1} <= set(expected_bins(test_y[(test_y < 2) | (test_y >= 8)]))
    assert not np.allclose(out, test_x)


def test_features_pass_through_before_start_smooth():
    module = make_module(start_smooth=2)
    features, labels = epoch_data(7)
    run_epoch(module, features, labels)
    x = torch.from_numpy(features)
    assert module(x, torch.from_numpy(labels)) is x
    module.end_epoch()
    assert not torch.equal(module(x, torch.from_numpy(labels)), x)


def test_gradient_is_the_per_sample_scale():
    module = make_module()
    features, labels = epoch_data(8)
    run_epoch(module, features, labels)
    x = torch.from_numpy(features).requires_grad_(True)
    out = module(x, torch.from_numpy(labels))
    (grad,) = torch.autograd.grad(out.sum(), x)
    bins = expected_bins(labels)
    scale = np.sqrt(np.clip(module.smoothed_var.numpy() / module.last_epoch_var.numpy(), 0.1, 10.0))[bins]
    np.testing.assert_allclose(grad.numpy(), scale, rtol=1e-12)
    assert not np.allclose(scale, 1.0)


def test_all_reduce_of_two_workers_equals_one_worker():
    whole, left, right = make_module(), make_module(), make_module()
    names = ("_count", "_sum", "_sum_sq")
    for epoch in range(2):
        features, labels = epoch_data(10 + epoch)
        half = len(labels) // 2
        left(torch.from_numpy(features[:half]), torch.from_numpy(labels[:half]))
        right(torch.from_numpy(features[half:]), torch.from_numpy(labels[half:]))
        # A real all_reduce runs on both workers at once; sum the pairs up front to emulate it.
        summed = {name: getattr(left, name) + getattr(right, name) for name in names}
        for worker in (left, right):
            def all_reduce(tensor, worker=worker):
                name = next(name for name in names if getattr(worker, name) is tensor)
                tensor.copy_(summed[name])
            worker.end_epoch(all_reduce)
        run_epoch(whole, features, labels, batches=1)
    for name, buffer in whole.state_dict().items():
        torch.testing.assert_close(left.state_dict()[name], buffer, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(right.state_dict()[name], buffer, rtol=1e-12, atol=1e-12)
    alone = make_module()
    run_epoch(alone, features[:half], labels[:half], batches=1)
    assert not torch.allclose(alone.running_mean, whole.running_mean)  # the reduction mattered


def test_state_dict_round_trip_keeps_stats_and_calibration():
    module = make_module()
    features, labels = epoch_data(12)
    run_epoch(module, features, labels)
    state = module.state_dict()
    assert {"running_mean", "running_var", "smoothed_mean", "smoothed_var", "last_epoch_mean",
            "last_epoch_var", "epochs_done"} == set(state)
    restored = make_module()
    restored.load_state_dict(state)
    for name, value in state.items():
        assert torch.equal(restored.state_dict()[name], value)
    x, y = torch.from_numpy(features), torch.from_numpy(labels)
    assert torch.equal(restored(x, y), module(x, y))
    assert int(restored.epochs_done) == 1
