import numpy as np
import pytest

from groupdir.grouping import GroupingError, make_grouping


def test_equal_width_edges_and_extremes():
    grouping = make_grouping(np.arange(0, 101), 10)  # range [0, 100] from the data: width 10
    groups = grouping.assign([0, 9.99, 10, 55, 99, 100])
    assert groups.tolist() == [0, 0, 1, 5, 9, 9]  # the maximum label lands in the last group


def test_equal_width_given_range_and_labels_outside_it():
    grouping = make_grouping([20, 30, 40, 50], 4, label_range=(0, 100))
    assert grouping.edges[:4] == (0.0, 25.0, 50.0, 75.0)
    assert grouping.assign([-5, 0, 24.9, 25, 100, 186]).tolist() == [0, 0, 0, 1, 3, 3]


def test_equal_frequency_balances_counts_without_splitting_a_label():
    rng = np.random.default_rng(0)
    labels = np.round(rng.gamma(4, 8, size=5000))
    grouping = make_grouping(labels, 5, "equal_frequency")
    groups = grouping.assign(labels)
    counts = np.bincount(groups, minlength=5)
    assert (counts > 0).all()
    assert counts.max() < 2 * counts.min()
    for value in np.unique(labels):  # every sample with one label value lands in one group
        assert len(np.unique(groups[labels == value])) == 1
    assert (np.diff(grouping.edges) > 0).all()


def test_equal_frequency_with_a_dominant_label_keeps_every_group_non_empty():
    labels = np.array([30] * 1000 + [1, 2, 3, 60, 70, 80])
    grouping = make_grouping(labels, 6, "equal_frequency")
    assert sorted(np.unique(grouping.assign(labels)).tolist()) == list(range(6))


@pytest.mark.parametrize("num_groups", [0, -1, 4])
def test_impossible_group_counts_are_refused(num_groups):
    with pytest.raises(GroupingError, match="num_groups"):
        make_grouping([1, 2, 3], num_groups)
