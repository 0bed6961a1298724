"""Bad, odd and huge image inputs: each ends in the right pixel values or one clear ProcessingError."""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import skimage.data

from ep_jax.errors import InputError
from ep_jax.errors import ProcessingError
from ep_jax.image_files import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, load_image
from ep_jax.images import ImageProcessor

CAMERA = skimage.data.camera()[::4, ::4].copy()  # 128x128 uint8 gray photo
CHELSEA = skimage.data.chelsea()  # 300x451 RGB photo
SMALL = ImageProcessor(size=32, crop_size=(32, 32))


def _png(path, width: int, height: int, *, bit_depth: int = 8, color_type: int = 2, pixels: np.ndarray | None = None):
    """Write a PNG by hand (PIL cannot write 16-bit RGB, nor a header that lies about the data).

    pixels: [H, W, C] (or [H, W]) array written big-endian at `bit_depth`; None writes no image
    data at all (a header-only file: PIL reads its size, decoding fails).
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))
    if pixels is not None:
        dtype = ">u2" if bit_depth == 16 else "u1"
        rows = pixels.reshape(height, -1).astype(dtype)
        out += chunk(b"IDAT", zlib.compress(b"".join(b"\x00" + r.tobytes() for r in rows)))
    path.write_bytes(out + chunk(b"IEND", b""))
    return path


def _pixels(image, ip: ImageProcessor = SMALL) -> np.ndarray:
    return ip(image)[0]


# ---------------------------------------------------------------------------------- size guard
def test_extreme_aspect_ratio_file_is_refused_before_decoding(tmp_path):
    # A 1x20000 PNG used to become a 336 x 6,720,000 intermediate (~10 GB) in the resize.
    path = tmp_path / "strip.png"
    PIL.Image.new("L", (1, 20000), 128).save(path)
    with pytest.raises(ProcessingError) as e:
        ImageProcessor()(str(path))
    msg = str(e.value)
    assert "strip.png" in msg and "1x20000" in msg and "20000:1" in msg and f"{MAX_ASPECT_RATIO:g}:1" in msg
    assert "PIL.ImageOps.pad(im, (400, 20000)" in msg  # the fix, with the numbers filled in
    # Arrays and PIL images get the same guard.
    with pytest.raises(ProcessingError, match=r"image array of shape \(60, 1\).* 60:1"):
        load_image(np.zeros((60, 1), np.uint8))
    with pytest.raises(ProcessingError, match=r"PIL image \(mode 'RGB', 3000x2\).* 1500:1"):
        SMALL(PIL.Image.new("RGB", (3000, 2)))


def test_aspect_ratio_at_the_limit_is_accepted_and_matches_transformers():
    from transformers import CLIPImageProcessorPil

    rng = np.random.default_rng(0)
    for h, w in [(7, 350), (350, 7), (1, 50)]:
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ours = ImageProcessor()(a)[0]
        hf = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
        ref = hf(PIL.Image.fromarray(a), return_tensors="np")["pixel_values"][0]
        assert np.abs(ours - ref).max() <= 1e-5


def test_resize_output_is_bounded_even_with_the_aspect_limit_raised():
    ip = ImageProcessor(max_aspect_ratio=1e9)
    with pytest.raises(ProcessingError, match=r"resizing 1x20000 to 336x6720000 would build 2257.9 megapixels"):
        ip(np.zeros((20000, 1), np.uint8))


def test_too_many_pixels_refused_from_the_header(tmp_path):
    # 12000x10000 claimed, no pixel data: decoding would fail as truncated, so the size error
    # proves the guard runs on the header, before decoding.
    path = _png(tmp_path / "big.png", 12000, 10000)
    with pytest.raises(ProcessingError) as e:
        load_image(path)
    msg = str(e.value)
    assert "big.png" in msg and "12000x10000 = 120 megapixels" in msg and "limit of 100 megapixels" in msg
    assert "thumbnail" in msg
    assert MAX_IMAGE_PIXELS == 100_000_000


def test_pil_decompression_bomb_becomes_our_error(tmp_path):
    huge = _png(tmp_path / "bomb.png", 20000, 10000)  # 200 MP: past PIL's own 179 MP error
    with pytest.raises(ProcessingError, match=r"bomb.png.* too large to decode.*200000000 pixels"):
        load_image(huge)
    # Between PIL's warning (89.5 MP) and our limit (100 MP) our limit decides: no PIL warning
    # escapes (this header-only file then fails as truncated, by name).
    mid = _png(tmp_path / "mid.png", 10000, 9500)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ProcessingError, match=r"cannot read image file .*mid.png.* truncated"):
            load_image(mid)


def test_max_pixels_is_configurable(tmp_path):
    path = tmp_path / "cam.png"
    PIL.Image.fromarray(CAMERA).save(path)
    with pytest.raises(ProcessingError, match=r"cam.png.*128x128 = 16,384 pixels, over the limit of 1,000 pixels "
                                               r"\(max_pixels=1000\)"):
        load_image(path, max_pixels=1000)
    with pytest.raises(ProcessingError, match=r"image array of shape \(128, 128\).*max_pixels=1000"):
        ImageProcessor(max_pixels=1000)(CAMERA)
    assert load_image(path, max_pixels=128 * 128).size == (128, 128)


def test_pad_to_square_never_builds_a_huge_canvas():
    # 300x30 fits max_pixels=10,000 but its padded square (90,000) does not: shrunk to 100x10 first.
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (30, 300, 3), dtype=np.uint8)
    naive = ImageProcessor(size=32, crop_size=(32, 32), do_pad=True)
    bounded = ImageProcessor(size=32, crop_size=(32, 32), do_pad=True, max_pixels=10_000)
    ref, out = naive(a)[0], bounded(a)[0]
    assert out.shape == ref.shape == (3, 32, 32)
    # A resampled picture of the same content: the same up to a few 8-bit levels, no more.
    assert np.abs(out - ref).mean() * 0.27 * 255 < 1.0
    with pytest.raises(ProcessingError, match=r"padded to a square is 300x300 = 90,000 pixels.*do_resize=False"):
        ImageProcessor(do_pad=True, do_resize=False, max_pixels=10_000)(a)


# ---------------------------------------------------------------------------------- modes
@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_gray_is_scaled_not_clipped(tmp_path, mode):
    wide = CAMERA.astype(np.uint32) * 257  # 16-bit version of the 8-bit photo
    if mode == "I":
        im = PIL.Image.fromarray(wide.astype(np.int32))
    else:
        im = PIL.Image.frombytes(mode, CAMERA.shape[::-1], wide.astype("<u2" if mode == "I;16" else ">u2").tobytes())
    assert im.mode == mode
    expected = _pixels(CAMERA)
    np.testing.assert_array_equal(_pixels(im), expected)
    # PIL's own convert("RGB") clips at 255 (almost all white): that is what we avoid.
    assert (np.asarray(im.convert("RGB")) == 255).mean() > 0.9
    # The same from a 16-bit PNG file (PIL opens it as "I;16").
    path = tmp_path / "gray16.png"
    PIL.Image.fromarray(wide.astype(np.uint16)).save(path)
    with PIL.Image.open(path) as f:
        assert f.mode == "I;16"
    np.testing.assert_array_equal(_pixels(path), expected)


def test_mode_i_out_of_16_bit_range_is_refused():
    im = PIL.Image.fromarray(np.array([[0, 70000], [5, 6]], np.int32))
    with pytest.raises(ProcessingError, match=r"mode 'I'.* values in \[0, 70000\].*16-bit"):
        load_image(im)


def test_float_mode_f_is_read_as_unit_range():
    im = PIL.Image.fromarray(CAMERA.astype(np.float32) / 255)
    assert im.mode == "F"
    np.testing.assert_array_equal(_pixels(im), _pixels(CAMERA))
    with pytest.raises(ProcessingError, match=r"mode 'F'.* has values in \[2, 255\]; float pixels must lie in \[0, 1"):
        load_image(PIL.Image.fromarray(CAMERA.astype(np.float32)))


def test_16_bit_rgb_png_and_uint16_arrays(tmp_path):
    rgb16 = CHELSEA.astype(np.uint16) * 257
    path = _png(tmp_path / "rgb16.png", CHELSEA.shape[1], CHELSEA.shape[0], bit_depth=16, color_type=2, pixels=rgb16)
    expected = _pixels(CHELSEA)
    np.testing.assert_array_equal(_pixels(path), expected)  # PIL opens it as 8-bit RGB (high byte)
    np.testing.assert_array_equal(_pixels(rgb16), expected)  # uint16 arrays: / 257
    np.testing.assert_array_equal(_pixels(rgb16.astype(">u2")), expected)
    np.testing.assert_array_equal(np.asarray(load_image(np.array([[0, 65535, 32896]], np.uint16))),
                                  [[[0] * 3, [255] * 3, [128] * 3]])


def test_cmyk_jpeg_matches_its_rgb_version(tmp_path):
    path = tmp_path / "cmyk.jpg"
    PIL.Image.fromarray(CHELSEA).convert("CMYK").save(path, quality=95)
    with PIL.Image.open(path) as f:
        assert f.mode == "CMYK"
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (451, 300)
    assert np.abs(np.asarray(im, np.int16) - CHELSEA).mean() < 3.0  # JPEG tolerance
    assert np.abs(_pixels(path) - _pixels(CHELSEA)).mean() < 0.05


@pytest.mark.parametrize("kind", ["1", "L", "P", "P+transparency", "LA", "RGBA", "CMYK", "YCbCr", "RGB+transparency"])
def test_pil_modes_match_transformers(kind):
    # transformers converts to RGB and composites transparency onto white; we keep its numbers.
    from transformers import CLIPImageProcessorPil

    rgb = PIL.Image.fromarray(CHELSEA)
    alpha = PIL.Image.fromarray(np.tile(np.linspace(0, 255, 451).astype(np.uint8), (300, 1)))
    im = {
        "1": lambda: rgb.convert("1"),
        "L": lambda: rgb.convert("L"),
        "P": lambda: rgb.convert("P"),
        "P+transparency": lambda: _with_info(rgb.convert("P"), transparency=0),
        "LA": lambda: PIL.Image.merge("LA", (rgb.convert("L"), alpha)),
        "RGBA": lambda: PIL.Image.merge("RGBA", (*rgb.split(), alpha)),
        "CMYK": lambda: rgb.convert("CMYK"),
        "YCbCr": lambda: rgb.convert("YCbCr"),
        "RGB+transparency": lambda: _with_info(rgb.copy(), transparency=tuple(int(v) for v in CHELSEA[0, 0])),
    }[kind]()
    hf = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ref = hf(im, return_tensors="np")["pixel_values"][0]
    assert np.abs(_pixels(im) - ref).max() <= 1e-5


def _with_info(im: PIL.Image.Image, **info) -> PIL.Image.Image:
    im.info.update(info)
    return im


def test_transparency_in_files_is_composited_onto_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[:2, :, 3] = 255  # top half opaque, bottom half fully transparent
    PIL.Image.fromarray(rgba).save(tmp_path / "rgba.png")
    la = PIL.Image.merge("LA", (PIL.Image.new("L", (4, 4), 10), PIL.Image.fromarray(rgba[..., 3])))
    la.save(tmp_path / "la.png")
    pal = PIL.Image.fromarray(rgba[..., :3]).convert("P")
    pal.putpixel((0, 0), 1)
    pal.save(tmp_path / "pal.png", transparency=1)
    top = np.asarray(load_image(tmp_path / "rgba.png"))
    np.testing.assert_array_equal(top[:2], np.full((2, 4, 3), (10, 20, 30)))
    np.testing.assert_array_equal(top[2:], 255)
    la_rgb = np.asarray(load_image(tmp_path / "la.png"))
    assert (la_rgb[:2] == 10).all() and (la_rgb[2:] == 255).all()
    assert tuple(np.asarray(load_image(tmp_path / "pal.png"))[0, 0]) == (255, 255, 255)
    # 4-channel arrays are RGBA, composited the same way.
    np.testing.assert_array_equal(np.asarray(load_image(rgba)), top)


def test_bilevel_png(tmp_path):
    bits = CAMERA > 100
    PIL.Image.fromarray(bits).save(tmp_path / "bits.png")
    with PIL.Image.open(tmp_path / "bits.png") as f:
        assert f.mode == "1"
    expected = np.repeat((bits * 255).astype(np.uint8)[..., None], 3, -1)
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "bits.png")), expected)
    np.testing.assert_array_equal(np.asarray(load_image(bits)), expected)  # bool arrays: 0 / 255


def test_exif_rotated_jpeg_is_read_as_a_viewer_shows_it(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    PIL.Image.fromarray(CHELSEA).save(path, quality=95, exif=exif)
    im = load_image(path)
    upright = np.asarray(PIL.Image.fromarray(CHELSEA).transpose(PIL.Image.Transpose.ROTATE_270))
    assert im.size == (300, 451)  # width and height swapped
    assert np.abs(np.asarray(im, np.int16) - upright).mean() < 3.0  # JPEG tolerance
    # A PIL image is taken as it is (transformers' processor does not transpose it either).
    with PIL.Image.open(path) as f:
        assert load_image(f).size == (451, 300)


# ---------------------------------------------------------------------------------- arrays
def test_float_arrays_nan_inf_and_range():
    a = CHELSEA / 255.0
    np.testing.assert_array_equal(_pixels(a), _pixels(CHELSEA))
    np.testing.assert_array_equal(_pixels(a.astype(np.float32)), _pixels(CHELSEA))
    bad = a.copy()
    bad[3, 4, 1] = np.nan
    with pytest.raises(ProcessingError, match=r"array of shape \(300, 451, 3\) and dtype float64 holds NaN values \(1 of"):
        SMALL(bad)
    bad[3, 4, 1] = np.inf
    with pytest.raises(ProcessingError, match="holds infinite values"):
        load_image(bad)
    with pytest.raises(ProcessingError, match=r"values in \[-0.5, 0.905882\]; float pixels must lie in \[0, 1\]"):
        load_image(a - 0.5 * (a == a.min()))
    with pytest.raises(ProcessingError, match=r"values in \[0, 231\].*np.round\(a\).astype\(np.uint8\)"):
        load_image(CHELSEA.astype(np.float32))


@pytest.mark.parametrize("shape,dtype,pattern", [
    ((3, 40, 50), np.uint8, r"shape \(3, 40, 50\).*channels-first.*np.moveaxis"),
    ((40, 50, 2), np.uint8, r"shape \(40, 50, 2\).*HxWx3"),
    ((2, 40, 50, 3), np.uint8, r"shape \(2, 40, 50, 3\).*batch.*list"),
    ((40,), np.uint8, r"shape \(40,\).*HxWx3"),
    ((0, 0), np.uint8, r"shape \(0, 0\).* is empty \(0x0 pixels\)"),
    ((0, 5, 3), np.uint8, r"is empty \(5x0 pixels\)"),
    ((4, 4, 3), np.complex64, r"dtype complex64 is not an image dtype"),
])
def test_bad_array_shapes_and_dtypes(shape, dtype, pattern):
    with pytest.raises(ProcessingError, match=pattern):
        SMALL(np.zeros(shape, dtype))


def test_integer_arrays_and_array_likes():
    np.testing.assert_array_equal(_pixels(CHELSEA.astype(np.int64)), _pixels(CHELSEA))
    with pytest.raises(ProcessingError, match=r"values in \[0, 1000\].*np.uint16"):
        load_image(np.array([[0, 1000]], np.int32))

    class Tensor:  # what torch / jax arrays look like to us
        def __array__(self, dtype=None, copy=None):
            return CHELSEA

    np.testing.assert_array_equal(_pixels(Tensor()), _pixels(CHELSEA))
    with pytest.raises(ProcessingError, match=r"bytes \(3 bytes\).*io.BytesIO"):
        load_image(b"abc")


# ---------------------------------------------------------------------------------- files
def test_missing_directory_and_empty_files(tmp_path):
    with pytest.raises(ProcessingError, match=r"image file not found: '.*nowhere.jpg'; check the path"):
        load_image(tmp_path / "nowhere.jpg")
    with pytest.raises(ProcessingError, match="does not download images"):
        load_image("https://example.com/cat.jpg")
    with pytest.raises(ProcessingError, match=r"image path '.*' is a directory"):
        load_image(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ProcessingError, match=r"image file '.*empty.png' is empty \(0 bytes\)"):
        load_image(tmp_path / "empty.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files(tmp_path, fmt):
    full = tmp_path / f"full.{fmt.lower()}"
    PIL.Image.fromarray(CHELSEA).save(full, fmt)
    data = full.read_bytes()
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(data[: len(data) // 2])
    pattern = rf"cannot read image file '.*cut.{fmt.lower()}' as an image \(OSError: image file is truncated"
    with pytest.raises(ProcessingError, match=pattern):
        SMALL(str(cut))
    # Opened lazily by the caller, then handed over: the same error, not a traceback from PIL.
    with PIL.Image.open(cut) as im:
        with pytest.raises(ProcessingError, match=r"cannot read PIL image '.*cut.*'.*truncated or corrupt"):
            SMALL(im)


@pytest.mark.parametrize("name,data,kind", [
    ("notes.txt", b"hello, this is not a picture\nsecond line\n", "a text file"),
    ("doc.pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "a PDF document"),
    ("logo.svg", b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "an SVG"),
    ("photo.heic", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "a HEIC/HEIF image"),
    ("blob.bin", bytes(range(256)) * 4, ""),
])
def test_non_image_and_unsupported_formats(tmp_path, name, data, kind):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ProcessingError) as e:
        load_image(path)
    msg = str(e.value)
    assert name in msg and "PIL does not recognise its format" in msg and "convert it to PNG or JPEG" in msg
    assert kind in msg


def test_batch_errors_name_the_image_and_errors_are_input_errors(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    with pytest.raises(ProcessingError, match=r"^image 1 of 2: cannot read image file '.*bad.png'"):
        SMALL([CHELSEA, str(bad)])
    assert issubclass(ProcessingError, InputError) and issubclass(ProcessingError, ValueError)


# ---------------------------------------------------------------------------------- settings
def test_pixel_values_are_checked_finite_on_the_host():
    with pytest.raises(ProcessingError, match=r"pixel values of image array .* are not finite.*image_std"):
        ImageProcessor(size=8, crop_size=(8, 8), image_std=(1e-45, 1e-45, 1e-45))(CHELSEA)
    with pytest.raises(ProcessingError, match=r"image_std=\(0.5, 0.0, 0.5\) has a zero"):
        ImageProcessor(image_std=(0.5, 0.0, 0.5))
    with pytest.raises(ProcessingError, match=r"image_mean=\(nan, 0.5, 0.5\): need 3 finite numbers"):
        ImageProcessor(image_mean=(float("nan"), 0.5, 0.5))
