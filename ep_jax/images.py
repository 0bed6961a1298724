"""Images to pixel values, as Hugging Face's CLIP/LLaVA image processors compute them.

Numpy and PIL only. Reproduces transformers' `CLIPImageProcessorPil` / `LlavaImageProcessorPil`
(PIL bicubic resize of the shortest edge, floor-rounded long edge, floor-offset center crop,
float64 rescale then float32 normalise), so pixel values are bit-identical to what the Hugging
Face model was evaluated with.

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

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps

from ep_jax.errors import ProcessingError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the value HF configs store as "resample"

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
    im, label = _load_raw(src, max_pixels, max_aspect_ratio)
    return _to_rgb(im, label)


def _load_raw(src: Any, max_pixels: int, max_aspect_ratio: float) -> tuple[PIL.Image.Image, str]:
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
            f"{label} is {w}x{h} = {_count(w * h)}, over the limit of {_count(max_pixels)} "
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


def _count(pixels: int) -> str:
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
            f"{_count(max_pixels)} anyway: downscale the image first"
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


def _to_rgb(im: PIL.Image.Image, label: str = "image") -> PIL.Image.Image:
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


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """CLIP image preprocessing, pixel-identical to transformers' `CLIPImageProcessorPil`.

    With `do_pad=True` it is `LlavaImageProcessorPil(do_pad=True)`: the original LLaVA-1.5
    "pad to square" with the mean colour (int(mean * 255) per channel) before resizing.
    Defaults are CLIP ViT-L/14-336 (what LLaVA-1.5 uses). Note that llava-hf checkpoints ship a
    plain `CLIPImageProcessor` (no padding); the original LLaVA-1.5 pads — pick with `do_pad`.

    size: shortest edge to resize to (the long edge is floor(size * long / short)), or an exact
          (height, width).
    crop_size: (height, width) of the center crop.
    max_pixels, max_aspect_ratio: inputs larger or more elongated are refused (files before they
          are decoded); see the module docstring.
    """

    size: int | tuple[int, int] = 336
    crop_size: tuple[int, int] = (336, 336)
    do_resize: bool = True
    do_center_crop: bool = True
    resample: int = BICUBIC
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    do_pad: bool = False
    do_convert_rgb: bool = True
    max_pixels: int = MAX_IMAGE_PIXELS
    max_aspect_ratio: float = MAX_ASPECT_RATIO

    def __post_init__(self):
        sizes = [self.size] if isinstance(self.size, int) else list(self.size)
        if len(sizes) not in (1, 2) or any(int(v) < 1 for v in sizes) or any(int(v) < 1 for v in self.crop_size):
            raise ProcessingError(f"ImageProcessor size={self.size!r}, crop_size={self.crop_size!r}: sizes must be "
                                  "positive (a shortest edge, or (height, width))")
        for name in ("image_mean", "image_std"):
            v = getattr(self, name)
            if len(v) != 3 or not all(math.isfinite(float(x)) for x in v):
                raise ProcessingError(f"ImageProcessor {name}={v!r}: need 3 finite numbers")
        if any(float(x) == 0.0 for x in self.image_std):
            raise ProcessingError(f"ImageProcessor image_std={self.image_std!r} has a zero; normalising would "
                                  "divide by zero (CLIP uses OPENAI_CLIP_STD)")
        if not math.isfinite(float(self.rescale_factor)):
            raise ProcessingError(f"ImageProcessor rescale_factor={self.rescale_factor!r}: need a finite number "
                                  "(1/255)")
        if not (int(self.max_pixels) >= 1 and float(self.max_aspect_ratio) >= 1.0):
            raise ProcessingError(f"ImageProcessor max_pixels={self.max_pixels!r}, max_aspect_ratio="
                                  f"{self.max_aspect_ratio!r}: need max_pixels >= 1 and max_aspect_ratio >= 1")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dir(cls, path: str | Path, **overrides: Any) -> "ImageProcessor":
        """Read `preprocessor_config.json` (llava-hf hub layout) or the "image_processor" entry of
        `processor_config.json` (what transformers 5 `save_pretrained` writes) from `path`.

        Keys absent from the file take this class's defaults (CLIP ViT-L/336); `overrides` (field
        names of this class, e.g. `do_pad=True`) replace values read from the file.
        """
        path = Path(path)
        pre, proc = path / "preprocessor_config.json", path / "processor_config.json"
        if pre.is_file():
            d = _read_json(pre)
        elif proc.is_file():
            d = _read_json(proc).get("image_processor")
            if not isinstance(d, dict):
                raise ProcessingError(f"{proc} has no 'image_processor' settings; re-save the processor with "
                                      "transformers (processor.save_pretrained) or pass an ImageProcessor")
        else:
            raise ProcessingError(
                f"no preprocessor_config.json or processor_config.json in {str(path)!r}; point at a Hugging Face "
                "LLaVA checkpoint directory, or build ImageProcessor() (CLIP ViT-L/336 defaults) yourself"
            )
        return dataclasses.replace(cls.from_hf_dict(d), **overrides)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ImageProcessor":
        """Translate a Hugging Face image-processor dict (CLIP or LLaVA type)."""
        default = cls()
        kind = str(d.get("image_processor_type", "CLIPImageProcessor"))
        if not kind.startswith(("CLIPImageProcessor", "LlavaImageProcessor")):
            raise ProcessingError(f"image_processor_type={kind!r} is not supported; ep_jax reproduces "
                                  "CLIPImageProcessor and LlavaImageProcessor (LLaVA-1.5)")
        mean, std = d.get("image_mean", default.image_mean), d.get("image_std", default.image_std)
        return cls(
            size=_parse_size(d.get("size", default.size)),
            crop_size=_parse_crop(d.get("crop_size", default.crop_size)),
            do_resize=bool(d.get("do_resize", default.do_resize)),
            do_center_crop=bool(d.get("do_center_crop", default.do_center_crop)),
            resample=int(d.get("resample", default.resample)),
            do_rescale=bool(d.get("do_rescale", default.do_rescale)),
            rescale_factor=float(d.get("rescale_factor", default.rescale_factor)),
            do_normalize=bool(d.get("do_normalize", default.do_normalize)),
            image_mean=_triple(mean, "image_mean"),
            image_std=_triple(std, "image_std"),
            # For CLIPImageProcessor `do_pad` means "pad the batch to its largest image", a no-op
            # after the center crop; only the LLaVA processor pads each image to a square.
            do_pad=bool(d.get("do_pad")) and kind.startswith("LlavaImageProcessor"),
            do_convert_rgb=bool(d.get("do_convert_rgb", default.do_convert_rgb)),
        )

    # ------------------------------------------------------------------ geometry
    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize step (before the crop) for an input of that size."""
        if not self.do_resize:
            return height, width
        if not isinstance(self.size, int):
            return tuple(self.size)
        # transformers.image_transforms.get_resize_output_image_size: int(), i.e. floor.
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.size * long / short)
        return (new_long, self.size) if width <= height else (self.size, new_long)

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output, or None when it depends on the input's aspect ratio."""
        if self.do_center_crop:
            return tuple(self.crop_size)
        if self.do_resize and not isinstance(self.size, int):
            return tuple(self.size)
        return None

    # ------------------------------------------------------------------ processing
    def preprocess(self, image: Any) -> np.ndarray:
        """One image (anything `load_image` accepts) -> float32 [3, H, W]."""
        im, label = self._rgb(image)
        if self.do_pad:
            side = max(im.size)
            if side * side > self.max_pixels:
                # The padded square would be a huge intermediate (a 70,000 x 1,400 image pads to 5
                # gigapixels): shrink first so it fits. Not bit-identical with transformers, which
                # would build the full square; only images with a long side over sqrt(max_pixels).
                if not self.do_resize:
                    raise ProcessingError(
                        f"{label} padded to a square is {side}x{side} = {_count(side * side)}, over "
                        f"max_pixels={self.max_pixels}, and do_resize=False; downscale the image first"
                    )
                im = _shrink(im, math.isqrt(int(self.max_pixels)), self.resample)
            im = _pad_to_square(im, tuple(int(m * 255) for m in self.image_mean))
        if self.do_resize:
            h, w = self.resized_size(im.height, im.width)
            if h * w > self.max_pixels:
                raise ProcessingError(
                    f"{label}: resizing {im.width}x{im.height} to {w}x{h} would build {_count(h * w)}, "
                    f"over max_pixels={self.max_pixels}; crop or pad the image to a less elongated shape, or use a "
                    "smaller size"
                )
            im = im.resize((w, h), resample=self.resample)
        pixels = np.asarray(im)  # [H, W, 3] uint8
        if self.do_center_crop:
            pixels = _center_crop(pixels, self.crop_size)
        if self.do_rescale:
            # float64 product then float32, exactly as transformers' rescale.
            x = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            x = pixels.astype(np.float32)
        if self.do_normalize:
            with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # checked just below
                x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        if not np.isfinite(x).all():  # checked on the host, before any transfer to a device
            raise ProcessingError(
                f"pixel values of {label} are not finite after preprocessing (rescale_factor={self.rescale_factor}, "
                f"image_mean={self.image_mean}, image_std={self.image_std}); fix the image processor settings"
            )
        return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)

    def __call__(self, images: Any) -> np.ndarray:
        """A list of images (or one image) -> float32 [n, 3, H, W]."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            h, w = self.output_size or (0, 0)
            return np.zeros((0, 3, h, w), np.float32)
        out = []
        for i, im in enumerate(images):
            try:
                out.append(self.preprocess(im))
            except ProcessingError as e:
                if len(images) == 1:
                    raise
                raise ProcessingError(f"image {i} of {len(images)}: {e}") from None
        shapes = {o.shape for o in out}
        if len(shapes) > 1:
            raise ProcessingError(f"processed images have different shapes {sorted(shapes)}; enable "
                                  "do_center_crop or give an exact (height, width) size to batch them")
        return np.stack(out)

    def _rgb(self, image: Any) -> tuple[PIL.Image.Image, str]:
        raw, label = _load_raw(image, self.max_pixels, self.max_aspect_ratio)
        if not self.do_convert_rgb and raw.mode != "RGB":
            raise ProcessingError(f"{label} has mode {raw.mode!r} but do_convert_rgb=False; the vision tower "
                                  "needs 3 channels: set do_convert_rgb=True or convert the image to RGB")
        return _to_rgb(raw, label), label


def _shrink(im: PIL.Image.Image, max_side: int, resample: int) -> PIL.Image.Image:
    """Scale `im` down so that its long side is `max_side` (aspect ratio kept)."""
    scale = max_side / max(im.size)
    size = (max(1, min(max_side, round(im.width * scale))), max(1, min(max_side, round(im.height * scale))))
    return im.resize(size, resample=resample)


def _pad_to_square(im: PIL.Image.Image, color: tuple[int, ...]) -> PIL.Image.Image:
    # LLaVA's expand2square; offsets floor((long - short) / 2), like LlavaImageProcessor.pad_to_square.
    w, h = im.size
    if w == h:
        return im
    side = max(w, h)
    out = PIL.Image.new("RGB", (side, side), color)
    out.paste(im, ((side - w) // 2, (side - h) // 2))
    return out


def _center_crop(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """transformers.image_transforms.center_crop on [H, W, C]: floor offsets, zero pad if too small."""
    h, w = pixels.shape[:2]
    ch, cw = int(size[0]), int(size[1])
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return pixels[top:top + ch, left:left + cw]
    nh, nw = max(ch, h), max(cw, w)
    top_pad, left_pad = -(-(nh - h) // 2), -(-(nw - w) // 2)  # ceil
    canvas = np.zeros((nh, nw) + pixels.shape[2:], pixels.dtype)
    canvas[top_pad:top_pad + h, left_pad:left_pad + w] = pixels
    top, left = top + top_pad, left + left_pad
    return canvas[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ProcessingError(f"cannot read {path} as JSON ({e}); re-save the processor files") from None
    if not isinstance(d, dict):
        raise ProcessingError(f"{path} holds a {type(d).__name__}, not a JSON object")
    return d


def _parse_size(size: Any) -> int | tuple[int, int]:
    if isinstance(size, int):
        return size  # HF's get_size_dict(default_to_square=False): an int is the shortest edge
    if isinstance(size, dict):
        if set(size) == {"shortest_edge"}:
            return int(size["shortest_edge"])
        if set(size) == {"height", "width"}:
            return int(size["height"]), int(size["width"])
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    raise ProcessingError(f"image processor size={size!r} is not supported; use {{'shortest_edge': n}} "
                          "or {'height': h, 'width': w}")


def _parse_crop(crop: Any) -> tuple[int, int]:
    if isinstance(crop, int):
        return crop, crop
    if isinstance(crop, dict) and set(crop) == {"height", "width"}:
        return int(crop["height"]), int(crop["width"])
    if isinstance(crop, (list, tuple)) and len(crop) == 2:
        return int(crop[0]), int(crop[1])
    raise ProcessingError(f"image processor crop_size={crop!r} is not supported; use {{'height': h, 'width': w}}")


def _triple(v: Any, name: str) -> tuple[float, float, float]:
    if isinstance(v, (int, float)):
        return (float(v),) * 3
    if isinstance(v, (list, tuple)) and len(v) == 3:
        return tuple(float(x) for x in v)
    raise ProcessingError(f"{name}={v!r}: need one value or three (one per RGB channel)")
