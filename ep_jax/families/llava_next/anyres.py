"""AnyRes geometry of LLaVA-NeXT (host side, NumPy), exactly as transformers computes it.

An image of (height, width) is resized (aspect kept) and centre-padded to the best of the
grid pinpoints, cut into `side x side` tiles, and a base view (the whole image squashed to
`side x side`) goes first. Each crop gives a `g x g` feature grid (g = side / patch); the tile
features form one `(g*th) x (g*tw)` grid that is un-padded back to the image's aspect ratio,
and one `image_newline` token ends each of its rows. An image's visual tokens, in sequence
order: the base grid (g*g), then the un-padded tile grid row by row, each row + one newline.

Transformers' un-padding (`unpad_image`, `LlavaNextProcessor._get_unpadded_features`) uses
(height, width) and `int(round(x, 7))`; the original LLaVA repository
(`llava/model/llava_arch.py::unpad_image`) takes `int(x)` (truncation), so where
`original * scale` lands just below an integer (e.g. 47.99999999) it keeps one row or column
pair less of padding removed and the token count differs by 2*row or 2*column length.
"""

from __future__ import annotations

import math

import numpy as np


def select_best_resolution(size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """transformers.image_processing_utils.select_best_resolution: (height, width)."""
    oh, ow = size
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / ow, h / oh)
        dw, dh = int(ow * scale), int(oh * scale)
        eff = min(dw * dh, ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (h, w), eff, waste
    return best


def patch_output_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """transformers.image_processing_utils.get_patch_output_size: the aspect-kept resize."""
    oh, ow = size
    th, tw = target
    sw, sh = tw / ow, th / oh
    if sw < sh:
        return min(math.ceil(oh * sw), th), tw
    return th, min(math.ceil(ow * sh), tw)


def unpadded_box(size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1) of a (rows, cols) feature grid kept by transformers' `unpad_image`."""
    oh, ow = size
    ch, cw = grid
    if ow / oh > cw / ch:
        new_h = int(round(oh * (cw / ow), 7))
        pad = (ch - new_h) // 2
        return pad, ch - pad, 0, cw
    new_w = int(round(ow * (ch / oh), 7))
    pad = (cw - new_w) // 2
    return 0, ch, pad, cw - pad


def tile_grid(size, pinpoints, side: int) -> tuple[int, int]:
    """(tile rows, tile columns) of an image (transformers' get_anyres_image_grid_shape)."""
    h, w = select_best_resolution(size, pinpoints)
    return h // side, w // side


def num_crops(size, pinpoints, side: int) -> int:
    """Crops of one image: its tiles plus the base view (image_size_to_num_patches)."""
    h, w = select_best_resolution(size, pinpoints)
    return len(range(0, h, side)) * len(range(0, w, side)) + 1


def image_layout(size, pinpoints, side: int, patch: int):
    """One image's visual tokens in sequence order -> (feature [N]: the row of its crops'
    features [crops * g*g] each token takes, -1 for a newline; coords [N, 3]: (t, h, w) with
    t = 0 the base grid, t = 1 the un-padded tile grid, -1 for newlines; grids ((g, g), (rows, cols)))."""
    g = side // patch
    th, tw = tile_grid(size, pinpoints, side)
    r0, r1, c0, c1 = unpadded_box(size, (g * th, g * tw))
    base = np.arange(g * g)
    ys, xs = np.divmod(base, g)
    feats = [base]
    coords = [np.stack([np.zeros_like(ys), ys, xs], 1)]
    rows, cols = np.arange(r0, r1), np.arange(c0, c1)
    Y, X = np.meshgrid(rows, cols, indexing="ij")  # [rows, cols]
    tile = (Y // g) * tw + (X // g)
    idx = (1 + tile) * g * g + (Y % g) * g + (X % g)
    nl = np.full((len(rows), 1), -1)
    feats.append(np.concatenate([idx, nl], 1).reshape(-1))
    cy = np.concatenate([(Y - r0), nl], 1).reshape(-1)
    cx = np.concatenate([(X - c0), nl], 1).reshape(-1)
    ct = np.where(cy >= 0, 1, -1)
    coords.append(np.stack([ct, cy, cx], 1))
    return np.concatenate(feats), np.concatenate(coords).astype(np.int32), ((g, g), (r1 - r0, c1 - c0))


def num_image_tokens(size, pinpoints, side: int, patch: int) -> int:
    """Visual tokens of one image (LlavaNextProcessor._get_number_of_features, CLS dropped)."""
    g = side // patch
    th, tw = tile_grid(size, pinpoints, side)
    r0, r1, c0, c1 = unpadded_box(size, (g * th, g * tw))
    return g * g + (r1 - r0) * (c1 - c0 + 1)
