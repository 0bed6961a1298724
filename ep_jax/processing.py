"""Inputs for LLaVA: images to pixels, prompts to chat-formatted text, text to bucketed tokens.

Numpy in, numpy out; no jax and no torch. Images go through `ep_jax.images` (bit-identical to
transformers' CLIP/LLaVA image processors). The token path reproduces `LlavaProcessor`: the formatted text is tokenised once with the checkpoint's
tokenizer and every image token is expanded to `image_seq_len` copies.

Prompts are padded to a fixed set of bucket lengths so that a new prompt of a known bucket
reuses the compiled prefill instead of recompiling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ep_jax.errors import ProcessingError
from ep_jax.image_files import load_image  # noqa: F401  (re-exported: the image half of the inputs)
from ep_jax.images import BICUBIC, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor  # noqa: F401

__all__ = [
    "BICUBIC", "ChatTemplate", "DEFAULT_BUCKETS", "DEFAULT_IMAGE_TOKEN", "ImageProcessor", "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD", "ProcessingError", "Processor", "TEMPLATES", "format_prompt", "get_template", "load_image",
]

# Prompt lengths are padded up to one of these, so a new prompt of a known bucket never
# recompiles. Steps of 128 between 256 and 768 keep a LLaVA-1.5 prompt (576 image tokens + text)
# within ~100 tokens of its length: padding rows are computed in every layer, pruned or not.
DEFAULT_BUCKETS = (64, 128, 256, 384, 512, 640, 768, 1024, 1536, 2048, 3072, 4096)
DEFAULT_IMAGE_TOKEN = "<image>"


class TaggedPixels(np.ndarray):
    """Pixel values that carry, as attributes, the per-image arrays a family needs beside them
    (LLaVA-NeXT's `image_sizes`, Qwen2.5-VL's `image_grid_thw`), so a caller that passes only
    `pixel_values` on (the ECL profile, benchmarks) still gives the family what it needs."""

    def __new__(cls, pixels, **arrays):
        obj = np.asarray(pixels).view(cls)
        obj._tags = tuple(arrays)
        for name, value in arrays.items():
            setattr(obj, name, np.asarray(value))
        return obj

    def __array_finalize__(self, obj):
        self._tags = getattr(obj, "_tags", ())
        for name in self._tags:
            setattr(self, name, getattr(obj, name, None))


# ---------------------------------------------------------------------------------- templates
@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """prefix + [image slots] + prompt + suffix.

    image_slot: inserted once per image (with "{image}" replaced by the image token) in front of
    a prompt that has no image token of its own; None means the user must place the tokens.
    """

    name: str
    prefix: str = ""
    suffix: str = ""
    image_slot: str | None = None

    def format(self, prompt: str, *, num_images: int = 1, image_token: str = DEFAULT_IMAGE_TOKEN) -> str:
        found = prompt.count(image_token)
        if found == 0 and num_images > 0:
            if self.image_slot is None:
                raise ProcessingError(
                    f"prompt {_short(prompt)} has no {image_token!r} but {num_images} image(s) were given; the "
                    f"{self.name!r} template does not add one: put {image_token!r} where the image goes, or use "
                    "template='vicuna_v1'"
                )
            prompt = self.image_slot.replace("{image}", image_token) * num_images + prompt
        elif found != num_images:
            raise ProcessingError(
                f"prompt {_short(prompt)} has {found} {image_token!r} token(s) but {num_images} image(s) were "
                f"given for it; give one image per {image_token!r} (or remove the tokens for a text-only prompt)"
            )
        return self.prefix + prompt + self.suffix


_VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

TEMPLATES: dict[str, ChatTemplate] = {
    # LLaVA-1.5 conv_vicuna_v1 (sep " ", roles USER/ASSISTANT), image first: "<image>\n{prompt}".
    "vicuna_v1": ChatTemplate("vicuna_v1", _VICUNA_SYSTEM + " USER: ", " ASSISTANT:", "{image}\n"),
    # The prompt format on the llava-hf model cards (no system prompt).
    "llava_hf": ChatTemplate("llava_hf", "USER: ", " ASSISTANT:", "{image}\n"),
    # llava-v1.6-mistral-7b-hf (its model card): "[INST] <image>\n{prompt} [/INST]".
    "mistral_instruct": ChatTemplate("mistral_instruct", "[INST] ", " [/INST]", "{image}\n"),
    # llava-v1.6-34b-hf (ChatML, its model card's system prompt).
    "chatml": ChatTemplate("chatml", "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n",
                           "<|im_end|><|im_start|>assistant\n", "{image}\n"),
    # Qwen2.5-VL-*-Instruct's chat template (its default system prompt, one vision block per image).
    "qwen2_5_vl": ChatTemplate("qwen2_5_vl", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                               "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n",
                               "<|vision_start|>{image}<|vision_end|>"),
    # The prompt as is: the caller places the image tokens.
    "raw": ChatTemplate("raw"),
}


def get_template(template: str | ChatTemplate) -> ChatTemplate:
    if isinstance(template, ChatTemplate):
        return template
    try:
        return TEMPLATES[template]
    except KeyError:
        raise ProcessingError(f"unknown chat template {template!r}; choose one of {sorted(TEMPLATES)} "
                              "or pass a ChatTemplate") from None


def format_prompt(
    prompt: str,
    template: str | ChatTemplate = "vicuna_v1",
    image_token: str = DEFAULT_IMAGE_TOKEN,
    *,
    num_images: int = 1,
) -> str:
    """Wrap `prompt` in a chat template, adding `num_images` image slots if it has none.

    A prompt that already contains `image_token` keeps its own placement (the count must equal
    `num_images`). The "raw" template never adds a slot, so an image needs one in the prompt.
    """
    return get_template(template).format(prompt, num_images=num_images, image_token=image_token)


def _short(s: str, n: int = 60) -> str:
    return repr(s if len(s) <= n else s[: n - 3] + "...")


# ---------------------------------------------------------------------------------- processor
class Processor:
    """Tokenizer + ImageProcessor: prompts and images -> bucketed numpy model inputs.

    image_seq_len: visual tokens each image occupies in the decoder input (576 for LLaVA-1.5,
    `LlavaConfig.image_seq_len`); every image token in the text is expanded to that many copies,
    exactly as `LlavaProcessor` does.
    """

    def __init__(self, tokenizer: Any, image_processor: ImageProcessor, *, image_seq_len: int,
                 image_token: str | None = None):
        if not isinstance(image_seq_len, int) or image_seq_len < 1:
            raise ProcessingError(f"image_seq_len={image_seq_len!r}: need a positive int (576 for LLaVA-1.5)")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_seq_len = image_seq_len
        self.image_token = image_token or getattr(tokenizer, "image_token", None) or DEFAULT_IMAGE_TOKEN
        ids = tokenizer.encode(self.image_token, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise ProcessingError(
                f"the tokenizer has no single token for {self.image_token!r} (it encodes to {ids}); use the "
                "checkpoint's own tokenizer, or add it: tokenizer.add_special_tokens("
                f"{{'additional_special_tokens': [{self.image_token!r}]}})"
            )
        self.image_token_id = int(ids[0])
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else 0

    @classmethod
    def from_dir(cls, path: str | Path, *, image_seq_len: int | None = None, image_token: str | None = None,
                 image_processor: ImageProcessor | None = None) -> "Processor":
        """Tokenizer and image settings of a checkpoint directory (`ep_jax.tokenizer.load_tokenizer`).

        image_seq_len defaults to `LlavaConfig.image_seq_len` of the directory's config.json.
        """
        path = Path(path)
        if not path.is_dir():
            raise ProcessingError(f"checkpoint directory not found: {str(path)!r}")
        if image_seq_len is None:
            if not (path / "config.json").is_file():
                raise ProcessingError(f"no config.json in {str(path)!r} to read the visual token count from; "
                                      "pass image_seq_len= (576 for LLaVA-1.5)")
            from ep_jax.config import LlavaConfig

            image_seq_len = LlavaConfig.from_json(path / "config.json").image_seq_len
        from ep_jax.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(path)
        if image_processor is None:
            image_processor = ImageProcessor.from_dir(path)
        return cls(tokenizer, image_processor, image_seq_len=image_seq_len, image_token=image_token)

    def __repr__(self) -> str:
        return (
            f"Processor(tokenizer={type(self.tokenizer).__name__}(vocab={len(self.tokenizer)}), "
            f"image_token={self.image_token!r} (id {self.image_token_id}), image_seq_len={self.image_seq_len}, "
            f"pad_token_id={self.pad_token_id}, image_processor={self.image_processor!r})"
        )

    # ------------------------------------------------------------------ text
    def format(self, prompt: str, *, num_images: int = 1, template: str | ChatTemplate = "vicuna_v1") -> str:
        return format_prompt(prompt, template, self.image_token, num_images=num_images)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of formatted `text` (BOS as the tokenizer adds it), image tokens expanded."""
        return self._expand(self.tokenizer(text)["input_ids"])

    def image_token_counts(self, images: Sequence[Any]) -> list[int]:
        """Visual tokens each image becomes in the prompt (LLaVA-1.5: one fixed count)."""
        return [self.image_seq_len] * len(images)

    def prompt_length(self, prompt: str, images: Sequence[Any] = (), *,
                      template: str | ChatTemplate = "vicuna_v1") -> int:
        """The tokens `encode([prompt], [images])` gives, without computing any pixels (only the
        images' sizes are read)."""
        text = self.format(prompt, num_images=len(images), template=template)
        ids = self.tokenizer([text])["input_ids"][0]
        if ids.count(self.image_token_id) != len(images):
            raise ProcessingError(f"the prompt ({_short(text)}) tokenises to {ids.count(self.image_token_id)} image "
                                  f"tokens for {len(images)} image(s); put spaces or newlines around "
                                  f"{self.image_token!r}")
        return len(ids) - len(images) + sum(self.image_token_counts(images))

    def _expand(self, ids: Sequence[int]) -> list[int]:
        out: list[int] = []
        for t in ids:
            if t == self.image_token_id:
                out.extend([self.image_token_id] * self.image_seq_len)
            else:
                out.append(int(t))
        return out

    def encode(
        self,
        prompts: str | Sequence[str],
        images: Sequence[Any] | None = None,
        *,
        template: str | ChatTemplate = "vicuna_v1",
        bucket_sizes: Sequence[int] | None = DEFAULT_BUCKETS,
        pad_side: str = "left",
        max_length: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Prompts (+ images) -> {"input_ids", "attention_mask" [B, S] int32, "pixel_values"
        [num_images, 3, H, W] float32, "lengths" [B] int32}.

        images: None, or one entry per prompt: an image, a list of images, or None (text only).
                pixel_values holds them in order of appearance (prompt by prompt, left to right).
        bucket_sizes: S is the smallest bucket >= the longest prompt, so prompts of a known bucket
                reuse compiled code; buckets are capped at max_length, and a prompt longer than
                every bucket gets S = max_length (an error without one). None: S = longest prompt.
        max_length: the model context; a longer prompt is an error.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
            if images is not None and not isinstance(images, (list, tuple)):
                images = [images]
        prompts = list(prompts)
        if not prompts:
            raise ProcessingError("encode() got no prompts; pass a list of strings")
        if pad_side not in ("left", "right"):
            raise ProcessingError(f"pad_side={pad_side!r}; use 'left' (generation) or 'right'")
        per_prompt = self._images_per_prompt(prompts, images)
        texts = [self.format(p, num_images=len(ims), template=template) for p, ims in zip(prompts, per_prompt)]

        rows = []
        for i, (ids, ims) in enumerate(zip(self.tokenizer(texts)["input_ids"], per_prompt)):
            if ids.count(self.image_token_id) != len(ims):  # e.g. the token glued into a longer word
                raise ProcessingError(f"prompt {i} ({_short(texts[i])}) tokenises to {ids.count(self.image_token_id)} "
                                      f"image tokens for {len(ims)} image(s); put spaces or newlines around "
                                      f"{self.image_token!r}")
            rows.append(self._expand(ids))
        lengths = np.array([len(r) for r in rows], np.int32)
        if max_length is not None:
            for i, n in enumerate(lengths):
                if n > max_length:
                    raise ProcessingError(
                        f"prompt {i} is {n} tokens ({len(per_prompt[i])} image(s) x {self.image_seq_len} visual "
                        f"tokens included) but the model context is max_length={max_length}; shorten the prompt "
                        "or use fewer images"
                    )
        seq_len = self._bucket(int(lengths.max()), bucket_sizes, max_length)

        input_ids = np.full((len(rows), seq_len), self.pad_token_id, np.int32)
        attention_mask = np.zeros((len(rows), seq_len), np.int32)
        for i, r in enumerate(rows):
            span = slice(seq_len - len(r), seq_len) if pad_side == "left" else slice(0, len(r))
            input_ids[i, span] = r
            attention_mask[i, span] = 1
        flat = [im for ims in per_prompt for im in ims]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": self.image_processor(flat),
            "lengths": lengths,
        }

    def decode(self, ids: Any) -> str:
        """1-D token ids -> text, special tokens (image, pad, BOS/EOS) skipped, whitespace stripped."""
        a = np.asarray(ids)
        if a.ndim != 1:
            raise ProcessingError(f"decode() takes one sequence of ids, got shape {a.shape}; "
                                  "decode each row: [processor.decode(r) for r in ids]")
        return self.tokenizer.decode(a.astype(np.int64).tolist(), skip_special_tokens=True).strip()

    @staticmethod
    def _images_per_prompt(prompts: list[str], images: Sequence[Any] | None) -> list[list[Any]]:
        if images is None:
            return [[] for _ in prompts]
        if not isinstance(images, (list, tuple)):
            raise ProcessingError(f"images must be a list with one entry per prompt, got {type(images).__name__}")
        if len(images) != len(prompts):
            raise ProcessingError(
                f"got {len(images)} image entries for {len(prompts)} prompts; pass one entry per prompt "
                "(an image, a list of images for a prompt with several image tokens, or None)"
            )
        return [[] if e is None else list(e) if isinstance(e, (list, tuple)) else [e] for e in images]

    @staticmethod
    def _bucket(longest: int, bucket_sizes: Sequence[int] | None, max_length: int | None) -> int:
        if not bucket_sizes:
            return longest
        fits = [b for b in sorted(bucket_sizes) if b >= longest]
        if not fits:
            if max_length is not None and longest <= max_length:
                return max_length
            raise ProcessingError(
                f"the longest prompt is {longest} tokens, longer than the largest bucket {max(bucket_sizes)}; "
                f"pass bucket_sizes with a bucket >= {longest} (or bucket_sizes=None)"
            )
        return min(fits[0], max_length) if max_length is not None else fits[0]
