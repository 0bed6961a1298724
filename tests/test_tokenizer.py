"""ep_jax.tokenizer.Tokenizer against transformers' AutoTokenizer: same ids, same decoded text,
same special tokens; and loading a processor without importing transformers."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ep_jax.tokenizer import Tokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "scenes-llava-tiny"

TEXTS = [
    "USER: <image>\nHow many circles are there? ASSISTANT:",
    "A chat between a curious human and an artificial intelligence assistant. USER: <image>\nWhat is this? ASSISTANT:",
    "Ünïcödé façade — 日本語のテスト, emoji 🙂🚀 and tabs\tnew\nlines",
    " leading space and trailing  ",
    "glued<image>token and <image><image> twice",
    "",
    "<s> already </s> special <pad><unk> tokens",
    "don't , stop . it 's fine ! right ?",
]


def _auto(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _assert_same(path):
    hf, ours = _auto(path), Tokenizer.from_dir(path)
    assert Tokenizer.supports(path)
    assert len(ours) == len(hf)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, attr) == getattr(hf, attr), attr
    assert getattr(ours, "image_token", None) == getattr(hf, "image_token", None)
    for text in TEXTS:
        for special in (True, False):
            ids = hf(text, add_special_tokens=special)["input_ids"]
            assert ours.encode(text, add_special_tokens=special) == ids, text
            assert ours(text, add_special_tokens=special)["input_ids"] == ids
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
    assert ours(TEXTS)["input_ids"] == hf(TEXTS)["input_ids"] == ours.encode_batch(TEXTS)
    assert ours.convert_tokens_to_ids("<image>") == hf.convert_tokens_to_ids("<image>")
    assert ours.convert_tokens_to_ids("certainly-not-a-token") == hf.convert_tokens_to_ids("certainly-not-a-token")
    return ours


def test_shipped_model_matches_transformers():
    tok = _assert_same(SHIPPED)
    assert tok.image_token == "<image>" and tok.image_token_id == 4 and tok.pad_token_id == 3


def test_tiny_hf_checkpoint_matches_transformers(tiny_dirs):
    _assert_same(tiny_dirs("mha")[0])


# ---------------------------------------------------------------------- llama-style tokenizers
_CORPUS = ["A chat between a curious human and an artificial intelligence assistant.",
           "USER: <image>\nWhat is in the image? ASSISTANT: a cat on a mat, don't you think?",
           "Ünïcödé 日本語 テスト emoji 🙂 ok"] * 5


def _llama_dir(out: Path, *, legacy_json: bool) -> Path:
    """A sentencepiece-style BPE (byte fallback, ▁ spaces) as llava-1.5 ships it: tokenizer_class
    LlamaTokenizer, add_bos_token, <image>/<pad> added, a llava config.json beside it."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    out.mkdir(parents=True)
    tok = Backend(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if legacy_json:  # the original llama tokenizer.json
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:  # re-saved with legacy=False
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(_CORPUS, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken("<image>", normalized=False, special=True),
                            AddedToken("<pad>", normalized=False, special=True)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "clean_up_tokenization_spaces": False, "legacy": False,
        "tokenizer_class": "LlamaTokenizer", "padding_side": "left", "model_max_length": 4096}))
    (out / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": {"model_type": "llama"}}))
    return out


def _edit(d: Path, tokenizer=None, config=None, special_tokens_map=None) -> Path:
    if tokenizer is not None:
        t = json.loads((d / "tokenizer.json").read_text())
        tokenizer(t)
        (d / "tokenizer.json").write_text(json.dumps(t))
    if config is not None:
        c = json.loads((d / "tokenizer_config.json").read_text())
        config(c)
        (d / "tokenizer_config.json").write_text(json.dumps(c))
    if special_tokens_map is not None:
        (d / "special_tokens_map.json").write_text(json.dumps(special_tokens_map))
    return d


def _no_image(t):
    t["added_tokens"] = [a for a in t["added_tokens"] if a["content"] != "<image>"]


VARIANTS = {
    "legacy_json": (True, {}),
    "metaspace_json": (False, {}),
    # transformers ignores add_bos/eos_token when a tokenizer.json exists: its post-processor rules
    "no_post_processor": (True, dict(tokenizer=lambda t: t.update(post_processor=None))),
    "add_eos_token": (True, dict(config=lambda c: c.update(add_eos_token=True, add_bos_token=False))),
    # a special token the tokenizer.json lacks is added, as transformers does
    "image_token_added": (True, dict(tokenizer=_no_image, config=lambda c: c.update(image_token="<image>"))),
    # the legacy special_tokens_map.json
    "special_tokens_map": (True, dict(tokenizer=_no_image, config=lambda c: c.pop("pad_token"),
                                      special_tokens_map={"pad_token": {"content": "<pad>", "lstrip": False,
                                                                        "normalized": False, "rstrip": False,
                                                                        "single_word": False},
                                                          "additional_special_tokens": ["<image>"]})),
    "clean_up_spaces": (True, dict(config=lambda c: c.update(clean_up_tokenization_spaces=True))),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_llama_style_tokenizers_match_transformers(tmp_path, variant):
    legacy, edits = VARIANTS[variant]
    _assert_same(_edit(_llama_dir(tmp_path / variant, legacy_json=legacy), **edits))


def test_model_specific_tokenizer_class_falls_back_to_transformers(tmp_path):
    """Without a LLaVA config.json beside it, AutoTokenizer builds LlamaTokenizer, which rebuilds
    the pre-tokenizer: tokenizer.json is not used as is, so neither is Tokenizer."""
    d = _llama_dir(tmp_path / "llama", legacy_json=True)
    (d / "config.json").unlink()
    assert not Tokenizer.supports(d)
    tok = load_tokenizer(d)
    assert type(tok).__name__ == "LlamaTokenizer"
    assert isinstance(load_tokenizer(SHIPPED), Tokenizer)


def test_broken_tokenizer_files(tmp_path):
    from ep_jax.errors import ProcessingError

    d = shutil.copytree(SHIPPED, tmp_path / "m", ignore=shutil.ignore_patterns("params"))
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(ProcessingError, match="cannot read .*tokenizer.json"):
        Tokenizer.from_dir(d)
    shutil.copy(SHIPPED / "tokenizer.json", d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text("[]")
    with pytest.raises(ProcessingError, match="tokenizer_config.json does not hold a JSON object"):
        Tokenizer.from_dir(d)


# ---------------------------------------------------------------------- processor start-up
def test_processor_loads_without_transformers():
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "from ep_jax.processing import Processor\n"
        f"p = Processor.from_dir({str(SHIPPED)!r})\n"
        "ids = p.tokenize('USER: <image>\\nHow many circles are there? ASSISTANT:')\n"
        "assert p.decode(ids) == 'USER: \\nHow many circles are there? ASSISTANT:', p.decode(ids)\n"
        "bad = [m for m in ('transformers', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print(type(p.tokenizer).__name__, round(time.perf_counter() - t, 2))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "Tokenizer"


def test_processor_encodes_as_with_transformers_tokenizer():
    import numpy as np

    from ep_jax.processing import ImageProcessor, Processor

    ours = Processor.from_dir(SHIPPED)
    theirs = Processor(_auto(SHIPPED), ImageProcessor.from_dir(SHIPPED), image_seq_len=ours.image_seq_len)
    prompts = ["How many circles are there?", "Is there a red square? Ünïcödé 🙂"]
    images = [np.zeros((224, 224, 3), np.uint8)] * 2
    a, b = ours.encode(prompts, images), theirs.encode(prompts, images)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert ours.decode(a["input_ids"][1]) == theirs.decode(b["input_ids"][1])
    assert repr(ours).startswith("Processor(tokenizer=Tokenizer(vocab=384), image_token='<image>' (id 4)")


def test_wordpiece_clean_up_matches_transformers(tmp_path):
    """clean_up_tokenization_spaces applies to non-BPE models (transformers skips it for BPE)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    d = tmp_path / "wp"
    d.mkdir()
    tok = Backend(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(_CORPUS + TEXTS, trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[UNK]", "[PAD]", "<image>"], show_progress=False))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": True,
        "unk_token": "[UNK]", "pad_token": "[PAD]", "image_token": "<image>"}))
    ours = _assert_same(d)
    ids = ours.encode("don't stop . it 's fine !")
    assert ours.decode(ids) == "don't stop. it's fine!"
