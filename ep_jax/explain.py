"""`--explain`: the image with the kept patches highlighted, and the score map beside it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ep_jax.config import LlavaConfig


def score_grid(scores: np.ndarray, kept: np.ndarray, cfg: LlavaConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch scores and kept flags of one image on its g x g grid (CLS dropped if present)."""
    g = cfg.vision.grid_size
    if cfg.vision_feature_select_strategy == "full":
        scores, kept = scores[1:], kept[1:]
    if scores.shape[0] != g * g:
        raise ValueError(f"{scores.shape[0]} visual scores do not form the {g}x{g} patch grid of one image")
    return scores.reshape(g, g), kept.reshape(g, g)


def pixels_to_image(pixels: np.ndarray, mean, std) -> np.ndarray:
    """Undo the CLIP normalisation: [3, H, W] -> [H, W, 3] in [0, 1]."""
    img = pixels.transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
    return np.clip(img, 0.0, 1.0)


def write_explanation(path: str | Path, cfg: LlavaConfig, gen, example: int = 0) -> Path:
    """Two panels: the model's view of the image with pruned patches dimmed, and the scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, stage = gen.prefill, gen.stage
    visual = np.asarray(res.visual_positions[example])
    kept_seq = np.asarray(res.kept_mask[example])
    scores = np.asarray(res.scores[example], np.float64)
    n_img = cfg.image_seq_len
    scores, kept = score_grid(scores[:n_img], kept_seq[visual][:n_img], cfg)
    ip = getattr(gen, "image_processor", None)
    mean = getattr(ip, "image_mean", (0.48145466, 0.4578275, 0.40821073))
    std = getattr(ip, "image_std", (0.26862954, 0.26130258, 0.27577711))
    first_image = sum(1 for _ in range(example))  # one image per example in the CLI
    img = pixels_to_image(np.asarray(gen.inputs["pixel_values"][first_image], np.float32), mean, std)

    g = cfg.vision.grid_size
    p = img.shape[0] // g
    mask = np.kron(kept, np.ones((p, p)))[..., None]
    shown = img * (0.25 + 0.75 * mask)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
    axes[0].imshow(shown)
    for (y, x) in zip(*np.nonzero(kept)):
        axes[0].add_patch(plt.Rectangle((x * p - 0.5, y * p - 0.5), p, p, fill=False, lw=0.6, ec="yellow"))
    axes[0].set_title(f"kept {int(kept.sum())}/{kept.size} patches (K={stage.layer}, R={stage.keep})")
    finite = np.where(np.isfinite(scores), scores, np.nan)
    im = axes[1].imshow(finite, cmap="magma")
    axes[1].set_title(f"{stage.config.method} score ({stage.config.source})" if stage.config.method == "entropy"
                      else f"{stage.config.method} score")
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
