"""The Entropy Collapse Layer profile shown to a person: the plot (`profile.png`) and the
table `python -m ep_jax.ecl` prints. The measurement and the rule are `analysis/ecl.py`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ep_jax.analysis.ecl import EclResult, EntropyProfile
from ep_jax.files import atomic_path

FIG_SIZE = (8.0, 6.0)  # inches
FIG_DPI = 100
AXES_TOP = (0.10, 0.56, 0.86, 0.36)  # figure fractions: left, bottom, width, height
AXES_BOTTOM = (0.10, 0.09, 0.86, 0.36)
ECL_COLOR = "#ff0000"  # the ECL marker; nothing else in the plot uses pure red
CANDIDATE_COLOR = "#888888"


def marker_x(layer: int) -> float:
    """x (data units) of the ECL marker: between j = K-1 and j = K, where the drop happens."""
    return layer - 0.5


def plot_profile(profile: EntropyProfile, result: EclResult, path: str | Path, title: str | None = None) -> Path:
    """`profile.png`: set entropy (top) and the token-wise score (bottom, mean and quantile band)
    against the layer index j, the ECL marked by a red vertical line between j = K-1 and K
    (a grey dotted line at the best candidate when no collapse was found).

    The axes sit at fixed figure positions (`AXES_TOP`, `AXES_BOTTOM`) with x limits
    `[-0.5, L + 0.5]`, so a marker's pixel column is known in advance.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_layers = profile.num_layers
    j_all = np.arange(num_layers + 1)
    fig = plt.figure(figsize=FIG_SIZE, dpi=FIG_DPI)
    top = fig.add_axes(AXES_TOP)
    bottom = fig.add_axes(AXES_BOTTOM, sharex=top)

    ent = profile.set_entropy
    top.plot(j_all, ent.mean(0), "o-", color="#1f77b4", ms=3, lw=1.5, label="mean over images")
    if profile.num_examples > 1:
        top.fill_between(j_all, ent.min(0), ent.max(0), color="#1f77b4", alpha=0.2, lw=0, label="min-max")
    top.set_ylabel("set matrix entropy")
    top.set_title(title or "visual-token matrix entropy by layer")

    qs = profile.score_quantiles.mean(0)
    j_score = j_all[:-1]
    bottom.fill_between(j_score, qs[:, 0], qs[:, -1], color="#2ca02c", alpha=0.2, lw=0,
                        label=f"q{profile.quantile_levels[0]:g}-q{profile.quantile_levels[-1]:g}")
    bottom.plot(j_score, profile.score_mean.mean(0), "o-", color="#2ca02c", ms=3, lw=1.5, label="mean")
    bottom.set_ylabel(f"token-wise score ({profile.source})")
    bottom.set_xlabel("j: states entering layer j (set entropy) / layer j's score (used for K = j+1)")

    if result.layer is not None:
        x, color, style = marker_x(result.layer), ECL_COLOR, "-"
        label = f"ECL: collapse in layer {result.layer - 1}, K = {result.layer}"
    else:
        x, color, style = marker_x(result.best), CANDIDATE_COLOR, ":"
        label = f"no collapse (largest drop {100 * result.rel_drops[result.best]:.1f}%)"
    for ax in (top, bottom):
        # aliased, so its pixels are exactly ECL_COLOR (found again by tests and scripts)
        ax.axvline(x, color=color, ls=style, lw=2.5, antialiased=False)
        ax.set_xlim(-0.5, num_layers + 0.5)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    top.text(x + 0.02 * (num_layers + 1), 0.04, label, transform=top.get_xaxis_transform(), color="#8b0000",
             fontsize=8, va="bottom")
    top.tick_params(labelbottom=False)
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=FIG_DPI, format="png")
    finally:
        plt.close(fig)
    return path


def format_table(profile: EntropyProfile, result: EclResult) -> str:
    """One row per index j: set entropy, its drop into j, and layer j's score statistics."""
    levels = profile.quantile_levels
    mid = levels.index(0.5) if 0.5 in levels else len(levels) // 2
    head = (f"{'j':>3}  {'entropy':>8}  {'std':>6}  {'drop':>7}  {'rel':>6}  {'score mean':>10}  "
            f"{'q' + format(levels[0], 'g'):>8}  {'q' + format(levels[mid], 'g'):>8}  {'q' + format(levels[-1], 'g'):>8}")
    lines = [head, "-" * len(head)]
    ent, std = profile.set_entropy.mean(0), profile.set_entropy.std(0)
    means, qs = profile.score_mean.mean(0), profile.score_quantiles.mean(0)
    lo, hi = result.window
    for j in range(profile.num_layers + 1):
        drop = "" if j == 0 else f"{result.drops[j]:+7.4f}"
        rel = "" if j == 0 else f"{100 * result.rel_drops[j]:5.1f}%"
        if j < profile.num_layers:
            score = f"{means[j]:10.4f}  {qs[j, 0]:8.4f}  {qs[j, mid]:8.4f}  {qs[j, -1]:8.4f}"
        else:
            score = f"{'(output)':>10}"
        mark = ""
        if j == result.layer:
            mark = "  <- K (ECL)"
        elif result.layer is None and j == result.best:
            mark = "  <- largest drop (below minimum)"
        elif j in result.tied:
            mark = "  <- tied"
        elif lo <= j <= hi:
            mark = "  ."
        lines.append(f"{j:>3}  {ent[j]:8.4f}  {std[j]:6.4f}  {drop:>7}  {rel:>6}  {score}{mark}")
    lines.append(f"(j = states entering layer j; '.' = candidate K in the early window {lo}..{hi})")
    return "\n".join(lines)
