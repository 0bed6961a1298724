"""Reading images: files, PIL images and arrays to RGB PIL images, safely (the pixel-value half
is `ep_jax/images.py`).

What an input becomes (every input ends in pixel values or one `ProcessingError` that names the
file or array, the value at fault and the fix; never a traceback from PIL):

- Files are opened lazily and their header size checked before anything is decoded: more than
  `MAX_IMAGE_PIXELS` (100 megapixels) or an aspect ratio beyond `MAX_ASPECT_RATIO` (50:1) is
  refused. Missing, empty, truncated, corrupt and non-image files (text, PDF, SVG, HEIC, ...) are
  refused by name. EXIF orientation is applied (`ImageOps.exif_transpose`): files are read as an
  image viewer shows them, as transformers' `load_image` does. PIL images passed in are used as
  they are (the processor does not transpose them, neither does transformers').
- Modes: RGB, L, 1, P, CMYK, YCbCr, LAB, HSV convert with PIL, as transformers does. Alpha
  (RGBA, LA, PA, P or RGB with a transparent colour) is composited onto white, as transformers'
  `convert_to_rgb` does. 16-bit gray ("I;16", "I;16B", ..., what PIL opens 16-bit PNG and TIFF
  files as, and "I", which Pillow before 10 opened them as: values must lie in 0..65535) is
  scaled to 8 bits (round(v / 257)) instead of clipped at 255 as PIL's and transformers'
  `convert("RGB")` do; "F" (32-bit float) is read as [0, 1] and scaled by 255, other values
  refused. 16-bit RGB(A) PNGs are opened by PIL as 8-bit RGB(A) (high byte kept).
- Arrays (numpy, or anything with `__array__`): HxWx3 channels last, HxW, HxWx1, HxWx4 (RGBA).
  uint8 as is; uint16 scaled by 1/257; other integers must lie in [0, 255]; bool is 0/255;
  floats must be finite and in [0, 1] (scaled by 255, rounded). NaN, inf, out-of-range values,
  channels-first, 1-D, empty and batched (4-D) arrays are refused with the shape/values and fix.
- Nothing accepted builds a huge intermediate: the aspect-ratio limit bounds the shortest-edge
  resize (at most size x 50*size), a resize whose output would exceed `max_pixels` is refused,
  and with `do_pad` an image whose padded square would exceed `max_pixels` is first shrunk
  (PIL, the processor's `resample`) so the square fits; only that case (long side > 10,000 px at
  the default limit) differs from transformers, which would allocate the full square.
- Pixel values are checked on the host (finite) before they are returned.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps

from ep_jax.errors import ProcessingError

# Refused before decoding. 100 MP is 300 MB of decoded RGB (400 MB in PIL's 4-byte layout) and
# covers every common camera and scan; PIL itself warns at 89.5 MP and refuses at 179 MP.
MAX_IMAGE_PIXELS = 100_000_000
# Long side / short side. The shortest-edge resize makes an image of size x (ratio * size) pixels
# (336 x 16,800 at 50:1); a 1x20000 strip would otherwise become 336 x 6,720,000 (6.7 GB).
MAX_ASPECT_RATIO = 50.0

_IMAGE_HELP = "pass a path to an image file, a PIL image, or an HxWx3 uint8 (or [0, 1] float) array"
_EXIF_ORIENTATION = 0x0112


# ---------------------------------------------------------------------------------- images
def load_image(
    src: Any, *, max_pixels: int = MAX_IMAGE_PIXELS, max_aspect_ratio: float = MAX_ASPECT_RATIO
) -> PIL.Image.Image:
    """Load `src` as an RGB PIL image (see the module docstring for every rule).

    Accepts a path (str or os.PathLike), a PIL image (any mode), or an array: HxWx3 (also HxW
    grayscale, HxWx1, HxWx4 RGBA), uint8, uint16 (scaled by 1/257), integer in [0, 255], bool, or
    float in [0, 1] (scaled by 255 and rounded). Transparency is composited onto white, as
    transformers' `convert_to_rgb` does; EXIF orientation of files is applied, as transformers'
    `load_image` does. Images over `max_pixels` pixels or with a long/short side ratio over
    `max_aspect_ratio` are refused (files before they are decoded).
    """
    im, label = open_image(src, max_pixels, max_aspect_ratio)
    return to_rgb(im, label)


def open_image(src: Any, max_pixels: int, max_aspect_ratio: float) -> tuple[PIL.Image.Image, str]:
    """`src` -> (PIL image in its own mode, a description of it for messages)."""
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        label = f"image file {str(path)!r}"
        return _open_image_file(path, label, max_pixels, max_aspect_ratio), label
    if isinstance(src, PIL.Image.Image):
        name = getattr(src, "filename", "") or ""
        label = f"PIL image {name!r}" if name else "PIL image"
        label += f" (mode {src.mode!r}, {src.width}x{src.height})"
        _check_size(src.size, label, max_pixels, max_aspect_ratio)
        try:
            src.load()  # an Image.open()ed image decodes here; a truncated file fails here
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad input, reported by name
            raise ProcessingError(f"cannot read {label} as an image ({type(e).__name__}: {e}); the file behind "
                                  "it is truncated or corrupt: re-export it as PNG or JPEG") from None
        return src, label
    if isinstance(src, (bytes, bytearray, memoryview)):
        raise ProcessingError(f"got {type(src).__name__} ({len(src)} bytes) as an image; for encoded file data "
                              "pass PIL.Image.open(io.BytesIO(data)) or write it to a file; " + _IMAGE_HELP)
    if isinstance(src, np.ndarray) or hasattr(src, "__array__"):
        try:
            a = np.asarray(src)
        except Exception as e:  # noqa: BLE001 - e.g. a tensor on an accelerator
            raise ProcessingError(
                f"cannot convert an object of type {type(src).__name__} to a numpy array ({type(e).__name__}: {e}); "
                "pass a numpy array (e.g. tensor.cpu().numpy())"
            ) from None
        label = f"image array of shape {a.shape} and dtype {a.dtype}"
        return _array_to_pil(a, label, max_pixels, max_aspect_ratio), label
    raise ProcessingError(f"cannot use an object of type {type(src).__name__} as an image; {_IMAGE_HELP}")


def _check_size(size: tuple[int, int], label: str, max_pixels: int, max_aspect_ratio: float) -> None:
    """The guard applied before decoding and before any resize: pixel count and aspect ratio."""
    w, h = int(size[0]), int(size[1])
    if w <= 0 or h <= 0:
        raise ProcessingError(f"{label} is empty ({w}x{h} pixels); pass an image with at least one pixel")
    if w * h > max_pixels:
        raise ProcessingError(
            f"{label} is {w}x{h} = {count_text(w * h)}, over the limit of {count_text(max_pixels)} "
            f"(max_pixels={max_pixels}); downscale it first (e.g. im.thumbnail((4096, 4096)) with "
            "PIL), or raise max_pixels if you have the memory"
        )
    ratio = max(w, h) / min(w, h)
    if ratio > max_aspect_ratio:
        fit = (w, math.ceil(w / max_aspect_ratio)) if w >= h else (math.ceil(h / max_aspect_ratio), h)
        shown = f"{ratio:.2f}".rstrip("0").rstrip(".")  # 20000, 50.01
        raise ProcessingError(
            f"{label} is {w}x{h}, an aspect ratio of {shown}:1, beyond the limit of {max_aspect_ratio:g}:1 "
            f"(max_aspect_ratio); resizing its short side to the model's input size would build a huge image. "
            f"Crop it into pieces, or pad it (e.g. PIL.ImageOps.pad(im, {fit}, color='white')), or raise "
            "max_aspect_ratio"
        )


def count_text(pixels: int) -> str:
    """120000000 -> '120 megapixels', 2257920000 -> '2257.9 megapixels', 16384 -> '16,384 pixels'."""
    if pixels < 1_000_000:
        return f"{pixels:,} pixels"
    return f"{pixels / 1e6:.1f}".rstrip("0").rstrip(".") + " megapixels"


def _open_image_file(path: Path, label: str, max_pixels: int, max_aspect_ratio: float) -> PIL.Image.Image:
    if not path.exists():
        hint = ("ep_jax does not download images: download it and pass the file's path"
                if str(path).startswith(("http:/", "https:/", "data:")) else
                f"check the path (relative paths are resolved from {str(Path.cwd())!r})")
        raise ProcessingError(f"image file not found: {str(path)!r}; {hint}")
    if path.is_dir():
        raise ProcessingError(f"image path {str(path)!r} is a directory, not a file; pass the path of an image file")
    if not path.is_file():
        raise ProcessingError(f"image path {str(path)!r} is not a regular file; pass the path of an image file")
    try:
        n_bytes = path.stat().st_size
    except OSError as e:
        raise ProcessingError(f"cannot read {label} ({type(e).__name__}: {e}); check its permissions") from None
    if n_bytes == 0:
        raise ProcessingError(f"{label} is empty (0 bytes); the download or export that wrote it failed: "
                              "write the image again")
    try:
        with warnings.catch_warnings():
            # Our own limit (max_pixels, checked below from the header) decides, not PIL's warning.
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as im:  # reads the header only
                _check_size(im.size, f"{label} ({im.format})", max_pixels, max_aspect_ratio)
                im.load()  # decode now, so a truncated or corrupt file fails here and not later
                return _exif_transpose(im)
    except ProcessingError:
        raise
    except PIL.Image.DecompressionBombError as e:
        raise ProcessingError(
            f"{label} is too large to decode: {e} (PIL.Image.MAX_IMAGE_PIXELS); ep_jax refuses more than "
            f"{count_text(max_pixels)} anyway: downscale the image first"
        ) from None
    except PIL.UnidentifiedImageError:
        kind = _sniff(path)
        raise ProcessingError(
            f"cannot read {label} as an image: PIL does not recognise its format"
            f"{f' (it looks like {kind})' if kind else ''}; convert it to PNG or JPEG"
        ) from None
    except Exception as e:  # noqa: BLE001 - OSError (truncated), SyntaxError, struct.error, EOFError, ...
        raise ProcessingError(
            f"cannot read {label} as an image ({type(e).__name__}: {e}); the file is truncated or corrupt: "
            "download or export it again (as PNG or JPEG)"
        ) from None


def _exif_transpose(im: PIL.Image.Image) -> PIL.Image.Image:
    """The image as a viewer shows it. A corrupt EXIF block leaves the pixels as stored."""
    try:
        if im.getexif().get(_EXIF_ORIENTATION, 1) in (1, None):
            return im  # nothing to do: no copy of a large image
        return PIL.ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - unreadable metadata, readable pixels
        return im


def _sniff(path: Path) -> str:
    """What a file PIL cannot identify probably is, for the error message."""
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
    except OSError:
        return ""
    stripped = head.lstrip()
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if stripped.startswith(b"<svg") or (stripped.startswith(b"<?xml") and b"<svg" in head):
        return "an SVG (vector) image: rasterise it first"
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"hevc", b"hevx", b"mif1", b"msf1"):
        return "a HEIC/HEIF image: install and register pillow-heif, or convert it"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    return "a text file" if all(c.isprintable() or c in "\r\n\t" for c in text) else ""


def _array_to_pil(a: np.ndarray, label: str, max_pixels: int, max_aspect_ratio: float) -> PIL.Image.Image:
    shape_help = f"got {label}; an image array must be HxWx3 (channels last), HxW, HxWx1 or HxWx4"
    if a.ndim == 4:
        raise ProcessingError(f"{shape_help}; this looks like a batch of images: pass a list (list(a))")
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        raise ProcessingError(f"{shape_help}; this looks channels-first: pass np.moveaxis(a, 0, -1)")
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (1, 3, 4))):
        raise ProcessingError(shape_help)
    _check_size((a.shape[1], a.shape[0]), label, max_pixels, max_aspect_ratio)
    u8 = _to_uint8(a, label)
    if u8.ndim == 3 and u8.shape[-1] == 1:
        u8 = u8[..., 0]
    return PIL.Image.fromarray(np.ascontiguousarray(u8))


def _to_uint8(a: np.ndarray, label: str) -> np.ndarray:
    """Pixel values of any supported dtype -> uint8 0..255, scaled (never clipped)."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * np.uint8(255)
    if a.dtype.kind == "u" and a.dtype.itemsize == 2:
        return _scale16(a)
    if a.dtype.kind in "iu":
        lo, hi = a.min(), a.max()
        if lo < 0 or hi > 255:
            raise ProcessingError(
                f"{label} has values in [{lo}, {hi}]; integer pixels must lie in [0, 255]; for 16-bit data "
                "(0..65535) pass a.astype(np.uint16)"
            )
        return a.astype(np.uint8)
    if a.dtype.kind == "f":
        if np.isnan(a).any():
            raise ProcessingError(f"{label} holds NaN values ({int(np.isnan(a).sum())} of {a.size}); fix or mask "
                                  "them before passing the image (e.g. np.nan_to_num(a))")
        if np.isinf(a).any():
            raise ProcessingError(f"{label} holds infinite values ({int(np.isinf(a).sum())} of {a.size}); float "
                                  "pixels must lie in [0, 1]")
        lo, hi = a.min(), a.max()
        if lo < 0.0 or hi > 1.0:
            raise ProcessingError(
                f"{label} has values in [{lo:g}, {hi:g}]; float pixels must lie in [0, 1] (for 0..255 data pass "
                "np.round(a).astype(np.uint8), or a / 255)"
            )
        return np.round(a.astype(np.float64) * 255.0).astype(np.uint8)
    raise ProcessingError(f"{label}: dtype {a.dtype} is not an image dtype; {_IMAGE_HELP}")


def _scale16(a: np.ndarray) -> np.ndarray:
    # round(v / 257) in integers: 0..65535 -> 0..255, and v * 257 -> v exactly.
    return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _high_depth_to_l(im: PIL.Image.Image, label: str) -> PIL.Image.Image:
    """Modes "I;16*", "I" (16-bit data) and "F" ([0, 1] floats) -> "L", scaled instead of clipped."""
    a = np.asarray(im)
    if "(mode" not in label:  # a file's label: say which mode the file decoded to
        label = f"{label} (mode {im.mode!r})"
    if im.mode == "F":
        return PIL.Image.fromarray(_to_uint8(a, label))
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi > 65535:
        raise ProcessingError(
            f"{label} has values in [{lo}, {hi}]; ep_jax reads modes 'I' and 'I;16' as 16-bit gray (0..65535, "
            "what PIL opens 16-bit PNG and TIFF files as): rescale it into 0..65535, or convert it to mode 'L' "
            "yourself"
        )
    return PIL.Image.fromarray(_scale16(a))


def to_rgb(im: PIL.Image.Image, label: str = "image") -> PIL.Image.Image:
    try:
        if im.mode == "F" or im.mode == "I" or im.mode.startswith("I;16"):
            im = _high_depth_to_l(im, label)
        # Same rule as transformers.image_transforms.convert_to_rgb: alpha composited onto white
        # (also for the premultiplied modes "RGBa" and "La", which transformers would not composite).
        bands = im.getbands()
        if "A" in bands or "a" in bands or im.info.get("transparency") is not None:
            rgba = im.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(white, rgba).convert("RGB")
        return im if im.mode == "RGB" else im.convert("RGB")
    except ProcessingError:
        raise
    except Exception as e:  # noqa: BLE001 - an exotic mode PIL cannot convert
        raise ProcessingError(f"cannot convert {label} (mode {im.mode!r}) to RGB ({type(e).__name__}: {e}); "
                              "convert it to RGB yourself first") from None
