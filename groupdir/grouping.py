"""Labels -> ordered group indices.

Equal width (the paper's and the authors' default) cuts a label range into `num_groups` bins of the
same width; labels outside the range fall into the first or last group. Equal frequency puts about
the same number of training samples into each group, never splitting one label value across two.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from groupdir.errors import GroupingError


@dataclass(frozen=True)
class Grouping:
    edges: tuple[float, ...]  # num_groups + 1 ascending boundaries; group g holds [edges[g], edges[g+1])

    @property
    def num_groups(self) -> int:
        return len(self.edges) - 1

    def assign(self, labels) -> np.ndarray:
        """Group index (int64) of each label; the first and last group are open-ended."""
        inner = np.asarray(self.edges[1:-1], dtype=np.float64)
        return np.searchsorted(inner, np.asarray(labels, dtype=np.float64), side="right").astype(np.int64)


def make_grouping(train_labels, num_groups: int, method: str = "equal_width",
                  label_range: tuple[float, float] | None = None) -> Grouping:
    labels = np.asarray(train_labels, dtype=np.float64)
    distinct = np.unique(labels)
    if num_groups < 1:
        raise GroupingError(f"num_groups={num_groups} must be >= 1")
    if num_groups > len(distinct):
        raise GroupingError(f"num_groups={num_groups} exceeds the {len(distinct)} distinct training labels")
    if method == "equal_width":
        low, high = label_range if label_range is not None else (distinct[0], distinct[-1])
        if not low < high:
            raise GroupingError(f"label range [{low}, {high}] is empty")
        # The top edge is nudged up so that the maximum label lands in the last group, not past it.
        edges = np.linspace(low, high, num_groups + 1)
        edges[-1] = np.nextafter(high, np.inf)
        return Grouping(tuple(float(e) for e in edges))
    if method == "equal_frequency":
        return Grouping(_equal_frequency_edges(labels, distinct, num_groups))
    raise GroupingError(f"unknown grouping {method!r}: use equal_width or equal_frequency")


def _equal_frequency_edges(labels, distinct, num_groups) -> tuple[float, ...]:
    counts = np.searchsorted(np.sort(labels), distinct, side="right")  # cumulative count up to each label
    cuts = []  # index into `distinct` of the first label of groups 1 .. G-1
    for g in range(1, num_groups):
        cut = int(np.searchsorted(counts, g * len(labels) / num_groups, side="left")) + 1
        # Every group keeps at least one distinct label, so cuts are strictly increasing and leave room.
        lowest = cuts[-1] + 1 if cuts else 1
        highest = len(distinct) - (num_groups - g)
        cuts.append(min(max(cut, lowest), highest))
    inner = [(distinct[c - 1] + distinct[c]) / 2 for c in cuts]
    return (float(distinct[0]), *map(float, inner), float(np.nextafter(distinct[-1], np.inf)))
