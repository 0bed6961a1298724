"""`--explain`: an image with the kept patches outlined, and the score map beside it; for a video,
a strip of its sampled frames (the first of each temporal patch) with the kept patches outlined.

Reads the visual spans (`core.spans`): each visual token's image and (t, h, w) cell on its grid,
so any family whose image is one grid of patches is drawn the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ep_jax.errors import InputError
from ep_jax.files import atomic_path

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def score_grid(gen, example: int = 0, image: int = 0, t: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scores and kept flags of one image of one example on its (h, w) token grid at time step
    / view `t` (LLaVA-NeXT: 0 the base view, 1 the tiles; tokens off the grid, such as a CLS or
    a row-end newline token, are left out)."""
    spans = gen.spans.example(example)
    scores = np.asarray(gen.prefill.scores[example], np.float64)[np.asarray(gen.spans.valid[example])]
    kept_seq = np.asarray(gen.prefill.kept_mask[example])
    mine = (spans.image[0] == image) & (spans.coords[0, :, 0] == t)
    if not mine.any():
        raise InputError(f"example {example} has no image {image} to explain")
    coords = spans.coords[0, mine]
    _, h, w = spans.grid[0, mine][0]
    grid_scores = np.full((h, w), np.nan)
    grid_kept = np.zeros((h, w), bool)
    grid_scores[coords[:, 1], coords[:, 2]] = scores[mine]
    grid_kept[coords[:, 1], coords[:, 2]] = kept_seq[spans.positions[0, mine]]
    return grid_scores, grid_kept


def pixels_to_image(pixels: np.ndarray, mean, std) -> np.ndarray:
    """Undo the normalisation: [3, H, W] -> [H, W, 3] in [0, 1]."""
    img = pixels.transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
    return np.clip(img, 0.0, 1.0)


def _has_view(gen, example: int, t: int) -> bool:
    spans = gen.spans.example(example)
    return bool(((spans.image[0] == 0) & (spans.coords[0, :, 0] == t)).any())


def _draw_kept(ax, img: np.ndarray, kept: np.ndarray) -> None:
    """`img` with the cells of the `kept` grid outlined and the others dimmed; the grid is
    stretched over the whole image (cells need not be square)."""
    import matplotlib.pyplot as plt

    h, w = img.shape[:2]
    gh, gw = kept.shape
    ch, cw = h / gh, w / gw
    rows = np.minimum((np.arange(h) / ch).astype(int), gh - 1)
    cols = np.minimum((np.arange(w) / cw).astype(int), gw - 1)
    mask = kept[rows[:, None], cols[None, :]][..., None]
    ax.imshow(img * (0.25 + 0.75 * mask))
    for (y, x) in zip(*np.nonzero(kept)):
        ax.add_patch(plt.Rectangle((x * cw - 0.5, y * ch - 0.5), cw, ch, fill=False, lw=0.6, ec="yellow"))


def write_explanation(path: str | Path, gen, example: int = 0, mean=CLIP_MEAN, std=CLIP_STD,
                      image=None) -> Path:
    """The model's view of the example's first image with pruned patches dimmed, and the scores.
    For an image seen at several views (LLaVA-NeXT: a base view and tiles), the base view is
    drawn, and, given the original `image` (an RGB array), the kept tile cells on it too (the
    un-padded tile grid covers the original image)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stage = gen.stage
    scores, kept = score_grid(gen, example)
    first_image = sum(int(np.asarray(gen.spans.image[i])[np.asarray(gen.spans.valid[i])].max(initial=-1)) + 1
                      for i in range(example))
    pixels = np.asarray(gen.inputs["pixel_values"])
    if pixels.ndim == 4:  # [crops or images, 3, H, W]: the model's own view of the image
        img = pixels_to_image(pixels[first_image].astype(np.float32), mean, std)
    elif image is not None:  # flattened patches (Qwen2.5-VL): the original image, resized by the grid
        img = np.asarray(image, np.float32)
        img = img / 255.0 if img.max() > 1 else img
    else:
        raise InputError("--explain needs the original image for a model whose pixel values are patches")

    tiles = image is not None and _has_view(gen, example, 1)
    fig, axes = plt.subplots(1, 3 if tiles else 2, figsize=(15 if tiles else 10, 4.8))
    keep = stage.keep if gen.keep is None else int(gen.keep[example])
    view = " of the base view" if _has_view(gen, example, 1) else ""
    _draw_kept(axes[0], img, kept)
    axes[0].set_title(f"kept {int(kept.sum())}/{kept.size} patches{view} (K={stage.layer}, R={keep})")
    im = axes[1].imshow(np.where(np.isfinite(scores), scores, np.nan), cmap="magma")
    axes[1].set_title(f"{stage.config.method} score ({stage.config.source})" if stage.config.method == "entropy"
                      else f"{stage.config.method} score")
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    if tiles:
        _, tile_kept = score_grid(gen, example, t=1)
        original = np.asarray(image, np.float32)
        _draw_kept(axes[2], original / 255.0 if original.max() > 1 else original, tile_kept)
        axes[2].set_title(f"kept {int(tile_kept.sum())}/{tile_kept.size} tile patches on the original image")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:  # the file appears whole or not at all
            fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
    return path


MAX_STRIP_PANELS = 32  # a longer video shows this many of its temporal patches, evenly spaced
STRIP_COLUMNS = 8


def write_video_strip(path: str | Path, gen, frames: np.ndarray, timestamps, *, example: int = 0, video: int = 0,
                      temporal_patch: int = 2) -> Path:
    """Video `video` (its index among the example's images and videos) of one example: the first
    frame of each temporal patch (`frames` [n, H, W, 3] uint8, the sampled frames) with the patches
    kept from that frame pair outlined, the rest dimmed; its time and kept count above it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spans = gen.spans.example(example)
    mine = spans.image[0] == video
    if not mine.any():
        raise InputError(f"example {example} has no video {video} to explain")
    steps = int(spans.grid[0, mine][0][0])
    shown = np.unique(np.linspace(0, steps - 1, min(steps, MAX_STRIP_PANELS)).round().astype(int))
    cols = min(STRIP_COLUMNS, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.2 * rows + 0.5), squeeze=False)
    for ax, t in zip(axes.flat, shown):
        _, kept = score_grid(gen, example, image=video, t=int(t))
        frame = min(int(t) * temporal_patch, len(frames) - 1)
        _draw_kept(ax, np.asarray(frames[frame], np.float32) / 255.0, kept)
        ax.set_title(f"{float(timestamps[frame]):.1f} s: kept {int(kept.sum())}/{kept.size}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        if not ax.images:
            ax.axis("off")
    stage = gen.stage
    keep = stage.keep if gen.keep is None else int(gen.keep[example])
    n = int(mine.sum())
    fig.suptitle(f"{stage.config.method} (K={stage.layer}, R={keep} over all visual tokens): this video keeps "
                 f"{int(np.asarray(gen.prefill.kept_mask[example])[spans.positions[0, mine]].sum())}/{n} tokens"
                 + ("" if len(shown) == steps else f"; {len(shown)} of {steps} frame pairs shown"), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
    return path
