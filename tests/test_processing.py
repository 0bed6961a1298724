"""ep_jax.processing against transformers' Pil image processors and LlavaProcessor."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import skimage.data

from ep_jax.processing import (
    TEMPLATES,
    ImageProcessor,
    Processor,
    ProcessingError,
    format_prompt,
    load_image,
)
from hf_tiny import IMAGE_TOKEN, build_tiny_llava

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions."
)


def _photos() -> dict[str, object]:
    rng = np.random.default_rng(0)
    astronaut = skimage.data.astronaut()  # 512x512 RGB
    rgba = np.dstack([astronaut, np.linspace(0, 255, 512 * 512).reshape(512, 512).astype(np.uint8)])
    return {
        "astronaut": astronaut,
        "chelsea": skimage.data.chelsea(),  # 300x451, wide
        "coffee": skimage.data.coffee(),  # 400x600, wide
        "tall": np.ascontiguousarray(skimage.data.chelsea().transpose(1, 0, 2)),  # 451x300
        "odd_333x500": np.asarray(PIL.Image.fromarray(skimage.data.coffee()).resize((500, 333))),
        "tiny_5x7": rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
        "gray": PIL.Image.fromarray(skimage.data.camera()),  # mode L
        "rgba": PIL.Image.fromarray(rgba, "RGBA"),
    }


PHOTOS = _photos()


def _hf_pixels(hf_processor, image) -> np.ndarray:
    if isinstance(image, np.ndarray):
        image = PIL.Image.fromarray(image)  # HF's PIL path; arrays of 3x3x3-ish shapes are ambiguous there
    return hf_processor(image, return_tensors="np")["pixel_values"][0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _, hf_processor = build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))
    return path, hf_processor, Processor.from_dir(path)


# ---------------------------------------------------------------------------------- images
@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_pixels_match_clip_image_processor(name):
    from transformers import CLIPImageProcessorPil

    hf = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    ours = ImageProcessor()(PHOTOS[name])
    ref = _hf_pixels(hf, PHOTOS[name])
    assert ours.shape == (1, 3, 336, 336) and ours.dtype == np.float32
    assert np.abs(ours[0] - ref).max() <= 1e-5
    assert ours.std() > 0.1  # a real picture, not a constant


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "tall", "odd_333x500", "tiny_5x7", "rgba"])
def test_pixels_match_llava_image_processor_pad_to_square(name):
    from transformers import LlavaImageProcessorPil

    hf = LlavaImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_pad=True)
    ref = _hf_pixels(hf, PHOTOS[name])
    padded = ImageProcessor(do_pad=True)(PHOTOS[name])[0]
    assert np.abs(padded - ref).max() <= 1e-5
    if name in ("chelsea", "tall"):
        # Padding changes the picture for non-square inputs; the border is the mean colour,
        # int(mean * 255) = (122, 116, 104), i.e. ~0 after normalisation.
        assert np.abs(ImageProcessor()(PHOTOS[name])[0] - padded).max() > 0.5
        border = padded[:, 0, 0]
        expected = ((np.array([122, 116, 104]) / 255) - np.array(ImageProcessor().image_mean)) / np.array(
            ImageProcessor().image_std
        )
        np.testing.assert_allclose(border, expected, atol=1e-5)


def test_resize_rounds_long_edge_down_and_crops_with_floor_offsets():
    ip = ImageProcessor()
    assert ip.resized_size(300, 451) == (336, 505)
    assert ip.resized_size(333, 500) == (336, 504)  # 504.50 -> 504 (int(), not round())
    assert ip.resized_size(500, 333) == (504, 336)
    assert ip.resized_size(5, 7) == (336, 470)
    assert ImageProcessor(size=(20, 30)).resized_size(300, 451) == (20, 30)
    # Crop offsets: (505 - 336) // 2 = 84 columns dropped on the left.
    wide = np.zeros((300, 451, 3), np.uint8)
    wide[:, :226] = 255
    out = ImageProcessor(do_normalize=False)(wide)[0]
    resized = np.asarray(PIL.Image.fromarray(wide).resize((505, 336), resample=3))
    np.testing.assert_allclose(out, resized[:, 84:84 + 336].transpose(2, 0, 1) / 255, atol=1e-6)


def test_image_processor_from_dir_processor_config(tiny):
    path, hf_processor, _ = tiny
    ip = ImageProcessor.from_dir(path)
    assert ip == ImageProcessor(size=32, crop_size=(32, 32))
    for name in ("coffee", "tiny_5x7", "gray"):
        ref = _hf_pixels(hf_processor.image_processor, PHOTOS[name])
        assert np.abs(ip(PHOTOS[name])[0] - ref).max() <= 1e-5


def test_image_processor_from_dir_preprocessor_config(tmp_path):
    # The llava-hf hub layout, with a LLaVA processor that pads to square.
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "do_pad": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25],
        "image_processor_type": "LlavaImageProcessor", "resample": 2,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 224},
    }))
    ip = ImageProcessor.from_dir(tmp_path)
    assert ip == ImageProcessor(size=224, crop_size=(224, 224), do_pad=True, resample=2,
                                image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25))
    assert ImageProcessor.from_dir(tmp_path, do_pad=False).do_pad is False
    with pytest.raises(ProcessingError, match="no preprocessor_config.json"):
        ImageProcessor.from_dir(tmp_path / "nowhere")


def test_load_image_sources(tmp_path):
    astronaut = skimage.data.astronaut()
    p = tmp_path / "a.png"
    PIL.Image.fromarray(astronaut).save(p)
    for src in (p, str(p), PIL.Image.fromarray(astronaut), astronaut, astronaut / 255.0):
        im = load_image(src)
        assert im.mode == "RGB" and im.size == (512, 512)
        np.testing.assert_array_equal(np.asarray(im), astronaut)
    gray = load_image(skimage.data.camera())
    assert gray.mode == "RGB" and np.array_equal(np.asarray(gray)[..., 1], skimage.data.camera())
    # Fully transparent pixels become white, opaque ones keep their colour.
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    np.testing.assert_array_equal(np.asarray(load_image(PIL.Image.fromarray(rgba, "RGBA")))[:, :, :],
                                  [[[10, 20, 30], [255, 255, 255]], [[255, 255, 255], [255, 255, 255]]])


def test_load_image_errors(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(ProcessingError, match="image file not found.*missing.png"):
        load_image(missing)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(ProcessingError, match="cannot read .*corrupt.png.* as an image"):
        load_image(corrupt)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(ProcessingError, match="garbage.png"):
        ImageProcessor()([str(garbage)])
    with pytest.raises(ProcessingError, match=r"shape \(3, 64, 64\).*channels-first"):
        load_image(np.zeros((3, 64, 64), np.uint8))
    with pytest.raises(ProcessingError, match=r"shape \(4, 4, 2\)"):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ProcessingError, match=r"\[0, 1\]"):
        load_image(np.full((4, 4, 3), 200.0))
    with pytest.raises(ProcessingError, match="type int"):
        load_image(3)
    with pytest.raises(ProcessingError, match="mode 'L' but do_convert_rgb=False"):
        ImageProcessor(do_convert_rgb=False)(PHOTOS["gray"])
    assert ImageProcessor(do_convert_rgb=False)(PHOTOS["chelsea"]).shape == (1, 3, 336, 336)
    assert issubclass(ProcessingError, ValueError)


# ---------------------------------------------------------------------------------- templates
def test_templates():
    assert set(TEMPLATES) >= {"vicuna_v1", "raw"}
    assert format_prompt("What is this?") == f"{VICUNA_SYSTEM} USER: <image>\nWhat is this? ASSISTANT:"
    # An explicit image token is kept where the user put it, not duplicated.
    assert format_prompt("Look: <image> what?") == f"{VICUNA_SYSTEM} USER: Look: <image> what? ASSISTANT:"
    assert format_prompt("Hi", num_images=0) == f"{VICUNA_SYSTEM} USER: Hi ASSISTANT:"
    assert format_prompt("<image>\nHi", "raw") == "<image>\nHi"
    assert format_prompt("Hi", "raw", num_images=0) == "Hi"
    assert format_prompt("Hi", image_token="<img>") == f"{VICUNA_SYSTEM} USER: <img>\nHi ASSISTANT:"
    with pytest.raises(ProcessingError, match="'raw' template does not add one"):
        format_prompt("Describe the photo.", "raw")
    with pytest.raises(ProcessingError, match="has 2 '<image>' token.* 1 image"):
        format_prompt("<image> and <image>", "raw", num_images=1)
    with pytest.raises(ProcessingError, match="unknown chat template 'alpaca'"):
        format_prompt("Hi", "alpaca")


# ---------------------------------------------------------------------------------- tokens
PARITY_CASES = [
    ("What is in the image?", "vicuna_v1"),
    ("Describe the photo in detail.", "llava_hf"),
    ("<image>\nHow many circles are there?", "raw"),
    ("USER: <image> What colour is the square? Is there a red triangle? ASSISTANT:", "raw"),
    ("the cat sits on a mat <image> near the window; yes or no?", "vicuna_v1"),
]


@pytest.mark.parametrize("prompt,template", PARITY_CASES)
def test_tokens_match_llava_processor(tiny, prompt, template):
    _, hf_processor, proc = tiny
    image = PHOTOS["chelsea"]
    text = proc.format(prompt, template=template)
    ref = hf_processor(text=text, images=PIL.Image.fromarray(image), return_tensors="np")
    out = proc.encode([prompt], [image], template=template, bucket_sizes=None)
    np.testing.assert_array_equal(out["input_ids"][0], ref["input_ids"][0])
    assert out["lengths"][0] == ref["input_ids"].shape[1]
    assert (out["input_ids"][0] == proc.image_token_id).sum() == proc.image_seq_len == 16
    assert out["input_ids"][0, 0] == proc.tokenizer.bos_token_id
    np.testing.assert_allclose(out["pixel_values"], ref["pixel_values"], atol=1e-5)


def test_processor_attributes(tiny):
    path, hf_processor, proc = tiny
    assert proc.image_token == IMAGE_TOKEN == hf_processor.image_token
    assert proc.image_token_id == hf_processor.image_token_id == 4
    assert proc.pad_token_id == proc.tokenizer.pad_token_id == 3
    assert proc.image_seq_len == 16  # (32 / 8)^2 patches, CLS dropped
    assert Processor.from_dir(path, image_seq_len=576).image_seq_len == 576
    r = repr(proc)
    assert "image_seq_len=16" in r and "'<image>' (id 4)" in r and "ImageProcessor(size=32" in r


def test_batch_tokens_and_images_in_order(tiny):
    _, hf_processor, proc = tiny
    prompts = ["What is in the image?", "Compare <image> with <image> please.", "Just text, no picture."]
    images = [PHOTOS["astronaut"], [PHOTOS["coffee"], PHOTOS["gray"]], None]
    out = proc.encode(prompts, images, pad_side="right")
    assert out["pixel_values"].shape == (3, 3, 32, 32)
    for k, name in enumerate(["astronaut", "coffee", "gray"]):
        ref = _hf_pixels(hf_processor.image_processor, PHOTOS[name])
        assert np.abs(out["pixel_values"][k] - ref).max() <= 1e-5
    hf_images = [[PIL.Image.fromarray(PHOTOS["astronaut"])], [PIL.Image.fromarray(PHOTOS["coffee"]), PHOTOS["gray"]]]
    for i, (prompt, ims) in enumerate(zip(prompts, images)):
        n_img = 0 if ims is None else len(ims) if isinstance(ims, list) else 1
        text = proc.format(prompt, num_images=n_img)
        ref = hf_processor(text=text, images=hf_images[i] if n_img else None)["input_ids"][0]
        n = out["lengths"][i]
        assert n == len(ref)
        np.testing.assert_array_equal(out["input_ids"][i, :n], ref)
        assert (out["input_ids"][i] == proc.image_token_id).sum() == 16 * n_img


def test_prompt_length_equals_encode_without_pixels(tiny, monkeypatch):
    _, _, proc = tiny
    prompts = ["What is in the image?", "Compare <image> with <image> please.", "Just text, no picture."]
    images = [[PHOTOS["astronaut"]], [PHOTOS["coffee"], PHOTOS["gray"]], []]
    want = [int(n) for n in proc.encode(prompts, [ims or None for ims in images], bucket_sizes=None)["lengths"]]
    monkeypatch.setattr(type(proc.image_processor), "__call__", lambda *a: pytest.fail("pixels computed"))
    assert [proc.prompt_length(p, ims, template="vicuna_v1") for p, ims in zip(prompts, images)] == want


def test_bucket_padding_left_and_right(tiny):
    _, _, proc = tiny
    prompts = [
        "<image>\nWhat is in the image?",
        "<image>\nDescribe the photo in detail. How many circles are there? Is there a red triangle?",
    ]
    images = [PHOTOS["chelsea"], PHOTOS["coffee"]]
    unpadded = [proc.encode([p], [im], template="raw", bucket_sizes=None)["input_ids"][0]
                for p, im in zip(prompts, images)]
    lens = [len(u) for u in unpadded]
    assert lens[0] < 64 < lens[1] < 128, lens
    for side in ("left", "right"):
        out = proc.encode(prompts, images, template="raw", pad_side=side)
        ids, mask = out["input_ids"], out["attention_mask"]
        assert ids.shape == mask.shape == (2, 128) and ids.dtype == mask.dtype == np.int32
        np.testing.assert_array_equal(out["lengths"], lens)
        assert out["lengths"].dtype == np.int32
        np.testing.assert_array_equal(mask.sum(1), lens)
        for i, u in enumerate(unpadded):
            n = len(u)
            real = ids[i, 128 - n:] if side == "left" else ids[i, :n]
            pads = ids[i, :128 - n] if side == "left" else ids[i, n:]
            np.testing.assert_array_equal(real, u)
            assert (pads == proc.pad_token_id).all()
            ones, zeros = np.ones(n), np.zeros(128 - n)
            np.testing.assert_array_equal(mask[i], np.r_[zeros, ones] if side == "left" else np.r_[ones, zeros])
    # A different prompt of the same bucket gets the same shape: nothing downstream recompiles.
    first = proc.encode(prompts[:1], images[:1], template="raw")["input_ids"]
    other = proc.encode(["<image> Is there a red triangle?"], [PHOTOS["astronaut"]], template="raw")["input_ids"]
    assert first.shape == other.shape == (1, 64)
    assert proc.encode(prompts[:1], images[:1], template="raw", bucket_sizes=(8, 16, 30, 50))["input_ids"].shape == (1, 30)
    # Buckets are capped at the model context, and a prompt past every bucket gets the context.
    assert proc.encode(prompts, images, template="raw", max_length=100)["input_ids"].shape == (2, 100)
    assert proc.encode(prompts, images, template="raw", bucket_sizes=(64,), max_length=90)["input_ids"].shape == (2, 90)


def test_decode(tiny):
    _, _, proc = tiny
    out = proc.encode(["What is in the image?"], None, template="raw", bucket_sizes=(64,))
    assert out["pixel_values"].shape == (0, 3, 32, 32)
    assert proc.decode(out["input_ids"][0]) == "What is in the image?"  # BOS and left pads skipped
    with_image = proc.encode(["How many circles?"], [PHOTOS["coffee"]])["input_ids"][0]
    assert proc.decode(with_image) == f"{VICUNA_SYSTEM} USER: \nHow many circles? ASSISTANT:"
    with pytest.raises(ProcessingError, match="one sequence"):
        proc.decode(out["input_ids"])


def test_encode_errors(tiny, tmp_path):
    _, _, proc = tiny
    img = PHOTOS["chelsea"]
    with pytest.raises(ProcessingError, match="'raw' template does not add one"):
        proc.encode(["Describe the photo."], [img], template="raw")
    with pytest.raises(ProcessingError, match="has 2 '<image>' token.* 1 image"):
        proc.encode(["<image> vs <image>"], [img], template="raw")
    with pytest.raises(ProcessingError, match="has 1 '<image>' token.* 0 image"):
        proc.encode(["<image> what?"], None)
    with pytest.raises(ProcessingError, match="got 1 image entries for 2 prompts"):
        proc.encode(["a", "b"], [img])
    with pytest.raises(ProcessingError, match=r"prompt 0 is \d+ tokens .*max_length=20"):
        proc.encode(["What is in the image?"], [img], max_length=20)
    with pytest.raises(ProcessingError, match="largest bucket 8"):
        proc.encode(["What is in the image?"], [img], bucket_sizes=(8,))
    with pytest.raises(ProcessingError, match="pad_side='middle'"):
        proc.encode(["hi"], None, pad_side="middle")
    with pytest.raises(ProcessingError, match="image file not found.*nope.jpg"):
        proc.encode(["hi"], [str(tmp_path / "nope.jpg")])
    with pytest.raises(ProcessingError, match="checkpoint directory not found"):
        Processor.from_dir(tmp_path / "absent")
