"""Visual spans: where each example's visual tokens sit, under static shapes (docs/ALGORITHM.md §8).

Every example of a batch may hold a different number `N` of visual tokens (no image, several
images, LLaVA-NeXT tiles, video frames). The compiled graph sees `n` slots per example, a static
maximum; slot `j` of example `i` is a real visual token when `valid[i, j]`, and then:

  positions[i, j]  its index in the token sequence (ascending over the valid slots)
  image[i, j]      which image / video of the example it belongs to (0, 1, ...)
  coords[i, j]     its (t, h, w) cell on that image's token grid; -1 for tokens off the grid
                   (a CLS token, LLaVA-NeXT's row-end newline tokens)
  grid[i, j]       the (t, h, w) size of that grid

Spans are built on the host (NumPy) by the family from the token ids and image sizes, and go
into the graph as ordinary arrays; the prune stage, the scorers, the reports and `--explain`
read them. Nothing here knows a model family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class VisualSpans:
    positions: np.ndarray  # int32 [b, n]
    valid: np.ndarray  # bool [b, n]
    image: np.ndarray  # int32 [b, n]
    coords: np.ndarray  # int32 [b, n, 3]
    grid: np.ndarray  # int32 [b, n, 3]

    @property
    def num_slots(self) -> int:
        return int(self.positions.shape[1])

    def counts(self) -> np.ndarray:
        """`N` of every example: its number of real visual tokens, [b]."""
        return np.asarray(self.valid).sum(axis=1).astype(np.int64)

    def example(self, i: int) -> "VisualSpans":
        """Example `i`'s valid slots only (host side: reports, `--explain`)."""
        keep = np.asarray(self.valid[i])
        pick = lambda a: np.asarray(a[i])[keep][None]  # noqa: E731
        return VisualSpans(pick(self.positions), pick(self.valid), pick(self.image), pick(self.coords),
                           pick(self.grid))


jax.tree_util.register_dataclass(
    VisualSpans, data_fields=["positions", "valid", "image", "coords", "grid"], meta_fields=[]
)


@dataclasses.dataclass(frozen=True)
class ImageSlots:
    """How one image (or video) lays out its visual tokens, in sequence order: `coords[k]` is the
    (t, h, w) cell of its k-th token (-1 off the grid) on a `grid` = (t, h, w) lattice."""

    coords: np.ndarray  # int32 [N, 3]
    grid: tuple[int, int, int]

    @classmethod
    def square(cls, side: int, *, leading: int = 0) -> "ImageSlots":
        """A `side x side` grid in raster order, after `leading` off-grid tokens (a CLS token)."""
        h, w = np.divmod(np.arange(side * side), side)
        cells = np.stack([np.zeros_like(h), h, w], axis=1)
        off = np.full((leading, 3), -1)
        return cls(np.concatenate([off, cells]).astype(np.int32), (1, side, side))

    def __len__(self) -> int:
        return len(self.coords)


def build_spans(is_visual: Sequence[np.ndarray], layouts: Sequence[Sequence[ImageSlots]], num_slots: int) -> VisualSpans:
    """Spans of a batch: for example `i`, the visual tokens are the True entries of `is_visual[i]`
    (its sequence mask), and `layouts[i]` are its images in order, whose token counts add up to
    them. `num_slots` >= every example's count (a static bucket)."""
    b = len(is_visual)
    positions = np.zeros((b, num_slots), np.int32)
    valid = np.zeros((b, num_slots), bool)
    image = np.zeros((b, num_slots), np.int32)
    coords = np.full((b, num_slots, 3), -1, np.int32)
    grid = np.zeros((b, num_slots, 3), np.int32)
    for i in range(b):
        where = np.flatnonzero(is_visual[i])
        sizes = [len(s) for s in layouts[i]]
        if sum(sizes) != len(where):
            raise ValueError(f"example {i}: {len(where)} visual tokens in the sequence but its images lay out "
                             f"{sum(sizes)} ({sizes})")
        if len(where) > num_slots:
            raise ValueError(f"example {i} holds {len(where)} visual tokens, more than the {num_slots} slots")
        n = len(where)
        positions[i, :n] = where
        valid[i, :n] = True
        if n:
            image[i, :n] = np.repeat(np.arange(len(sizes)), sizes)
            coords[i, :n] = np.concatenate([s.coords for s in layouts[i]])
            grid[i, :n] = np.concatenate([np.tile(s.grid, (len(s), 1)) for s in layouts[i]])
    return VisualSpans(positions, valid, image, coords, grid)
