"""One PNG per drift test, for the operator who opens a report: reference against window.

Statistics are drawn as overlaid histograms on the same bins, predicted classes as side-by-side
shares, and the embedding test as the histogram of the domain classifier's out-of-fold scores
for the window (a drifted window piles up near 1).
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Mapping

import numpy as np

from flywheel_data_monitor.drift import DriftTest, Features

__all__ = ["plot_test"]


def plot_test(
    test: DriftTest, reference: Features, window: Features, scores: Mapping[int, float]
) -> bytes:
    """The PNG of ``test`` (judged or not: an empty plot says so in its title)."""
    # matplotlib only for reports. A Figure of its own, not pyplot's global figure manager:
    # checks draw in worker threads, and savefig renders PNG without a display.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.6), dpi=100)
    axes = figure.subplots()
    if test.kind == "statistic":
        ref = np.asarray(reference.statistics.get(test.feature, ()), dtype=float)
        cur = np.asarray(window.statistics.get(test.feature, ()), dtype=float)
        both = np.concatenate([ref, cur]) if len(ref) + len(cur) else np.zeros(1)
        bins = [float(edge) for edge in np.histogram_bin_edges(both, bins=30)]
        axes.hist(ref, bins=bins, density=True, alpha=0.5, label="training reference")
        axes.hist(cur, bins=bins, density=True, alpha=0.5, label="production window")
        axes.set_xlabel(test.feature)
        axes.legend(loc="upper right")
    elif test.kind == "classes":
        ref_counts, cur_counts = Counter(reference.predicted), Counter(window.predicted)
        names = sorted(set(ref_counts) | set(cur_counts))
        positions = np.arange(len(names))
        for offset, counts, label in (
            (-0.2, ref_counts, "training reference"),
            (0.2, cur_counts, "production window"),
        ):
            total = max(1, sum(counts.values()))
            shares = [counts.get(name, 0) / total for name in names]
            axes.bar(positions + offset, shares, width=0.4, label=label)
        axes.set_xticks(positions, names)
        axes.set_xlabel("predicted class")
        axes.set_ylabel("share")
        axes.legend(loc="upper right")
    else:
        axes.hist(list(scores.values()), bins=20, range=(0, 1))
        axes.set_xlabel("domain classifier score (1: unlike the training data)")
        axes.set_ylabel("images in the window")
    verdict = "not judged" if not test.judged else ("DRIFT" if test.drifted else "no drift")
    effect = "" if test.effect is None else f", effect {test.effect:.2f}"
    p_value = "" if test.p_value is None else f", p={test.p_value:.2g}"
    axes.set_title(f"{test.feature}: {verdict}{effect}{p_value}", fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
