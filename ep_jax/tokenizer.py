"""A checkpoint's tokenizer from its `tokenizer.json`, with the `tokenizers` library only.

transformers' `AutoTokenizer` takes seconds to import and load (and imports torch when it is
installed); for a LLaVA directory it builds a `TokenizersBackend` around the very same
`tokenizer.json`. `Tokenizer` reproduces what that object does with the files, so ids and
decoded text are identical (tests/test_tokenizer.py compares them):

- special tokens (bos/eos/unk/pad/..., the image token, extra special tokens) come from
  `tokenizer_config.json`, else `special_tokens_map.json`; one missing from the tokenizer is
  added as a special token, as transformers does;
- BOS/EOS: the `tokenizer.json` post-processor adds them (llava-1.5's adds `<s>`). transformers 5
  ignores `add_bos_token` / `add_eos_token` of tokenizer_config.json whenever a tokenizer.json
  exists (`_from_pretrained` drops them), and so does this class;
- decoding: the tokenizer's decoder, with `clean_up_tokenization_spaces` applied as transformers
  does (never to BPE models unless forced).

`Tokenizer.supports(path)` says whether transformers would use `tokenizer.json` as is; when it
would build a model-specific class instead (e.g. `LlamaTokenizer` without a LLaVA config.json
beside it, which rebuilds the pre-tokenizer), `Processor.from_dir` falls back to transformers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ep_jax.errors import ProcessingError

# The named special tokens of transformers' tokenizers (SPECIAL_TOKENS_ATTRIBUTES).
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokenizer_class values for which transformers uses tokenizer.json as it is.
_GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast", "PreTrainedTokenizer")
# config.json model types for which AutoTokenizer always builds a TokenizersBackend (its
# TOKENIZER_MAPPING_NAMES entry), whatever tokenizer_class says.
_BACKEND_MODEL_TYPES = ("llava", "llava_next")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProcessingError(f"cannot read {path}: {e}", fix="restore the file from the original checkpoint") from None
    if not isinstance(data, dict):
        raise ProcessingError(f"{path} does not hold a JSON object", fix="restore the file from the original checkpoint")
    return data


def _content(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """Encode/decode with a `tokenizers.Tokenizer` and the checkpoint's special tokens.

    The subset of the transformers tokenizer API that ep_jax uses: `encode`, `__call__` (returns
    {"input_ids": ...}), `decode`, `convert_tokens_to_ids`, `token_to_id`, `len()`, and the
    `*_token` / `*_token_id` attributes (`image_token` included).
    """

    def __init__(self, backend: Any, special_tokens: dict[str, str] | None = None, *,
                 extra_special_tokens: Sequence[str] = (), clean_up_tokenization_spaces: bool = False,
                 clean_up_bpe: bool = False, name_or_path: str | None = None):
        self.backend = backend
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.extra_special_tokens = list(extra_special_tokens)
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self._clean_up_bpe = clean_up_bpe
        self.name_or_path = name_or_path

    # ------------------------------------------------------------------ loading
    @staticmethod
    def supports(path: str | Path) -> bool:
        """True when `path` has a tokenizer.json that transformers' AutoTokenizer uses unchanged."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            return False
        try:
            config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")) \
                if (path / "tokenizer_config.json").is_file() else {}
            model = json.loads((path / "config.json").read_text(encoding="utf-8")) \
                if (path / "config.json").is_file() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return True  # from_dir names the broken file
        if not isinstance(config, dict) or not isinstance(model, dict):
            return True
        if "auto_map" in config:  # remote code: only transformers can run it
            return False
        cls = config.get("tokenizer_class")
        return (cls is None and not model) or (isinstance(cls, str) and cls in _GENERIC_CLASSES) \
            or model.get("model_type") in _BACKEND_MODEL_TYPES

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """The tokenizer of a checkpoint directory (tokenizer.json + tokenizer_config.json)."""
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ProcessingError(f"no tokenizer.json in {str(path)!r}",
                                  fix="copy the tokenizer files of the original checkpoint into it")
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ProcessingError(f"cannot read {file}: {e}", fix="restore the file from the original checkpoint") \
                from None
        config = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
        if "added_tokens_decoder" not in config and (path / "special_tokens_map.json").is_file():
            # transformers reads the legacy map only then, and its values win
            for key, value in _read_json(path / "special_tokens_map.json").items():
                if key in ("extra_special_tokens", "additional_special_tokens") and isinstance(value, list):
                    old = config.get(key) if isinstance(config.get(key), list) else []
                    config[key] = old + [t for t in value if t not in old]
                else:
                    config[key] = value

        special: dict[str, str] = {}
        for key in NAMED_SPECIAL_TOKENS:
            if _content(config.get(key)) is not None:
                special[key] = _content(config[key])
        extra = config.get("extra_special_tokens")
        if extra is None:
            extra = config.get("additional_special_tokens")
        named_extra = dict(extra) if isinstance(extra, dict) else {}
        # model-specific named tokens: any other "*_token" string, e.g. "image_token"
        for key, value in config.items():
            if key.endswith("_token") and key not in special and _content(value) is not None:
                named_extra.setdefault(key, _content(value))
        for key, value in named_extra.items():
            if _content(value) is not None:
                special[key] = _content(value)
        extra_list = [_content(t) for t in extra if _content(t) is not None] if isinstance(extra, list) else []

        # Tokens transformers adds when the backend lacks them as added tokens: the ones listed in
        # added_tokens_decoder, then every special token (AddedToken(special=True)).
        present = {t.content for t in backend.get_added_tokens_decoder().values()}
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            for _, tok in sorted(decoder.items(), key=lambda kv: int(kv[0])):
                if isinstance(tok, dict) and isinstance(tok.get("content"), str) and tok["content"] not in present:
                    fields = {k: tok[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in tok}
                    backend.add_tokens([AddedToken(tok["content"], **fields)])
                    present.add(tok["content"])
        missing = [t for t in [*special.values(), *extra_list] if t not in present]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])

        tok = cls(backend, special, extra_special_tokens=extra_list,
                  clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
                  clean_up_bpe=bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
                                               False)),
                  name_or_path=str(path))
        return tok

    # ------------------------------------------------------------------ special tokens
    def __getattr__(self, name: str):
        # bos_token, image_token, ... and their *_id; only called for attributes not set normally
        special = self.__dict__.get("special_tokens", {})
        if name.endswith("_token_id") and name[:-3] in (*NAMED_SPECIAL_TOKENS, *special):
            token = special.get(name[:-3])
            return None if token is None else self.token_to_id(token)
        if name.endswith("_token") and name in (*NAMED_SPECIAL_TOKENS, *special):
            return special.get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys([*self.special_tokens.values(), *self.extra_special_tokens]))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]):
        """As transformers: unknown tokens map to the unk id (None without an unk token)."""
        if isinstance(tokens, str):
            i = self.token_to_id(tokens)
            return self.unk_token_id if i is None else i
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=False)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ProcessingError(f"encode() takes a string, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ProcessingError(f"text {i} is a {type(t).__name__}, not a string")
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True) -> dict[str, Any]:
        """{"input_ids": ids} for a string, {"input_ids": [ids, ...]} for a list (as transformers)."""
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        return {"input_ids": self.encode_batch(text, add_special_tokens)}

    def decode(self, ids: Sequence[int] | int, skip_special_tokens: bool = True) -> str:
        """Text of `ids` exactly as transformers' fast tokenizer decodes it."""
        if isinstance(ids, int):
            ids = [ids]
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces and (type(self.backend.model).__name__ != "BPE" or self._clean_up_bpe):
            text = clean_up_tokenization(text)
        return text

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name_or_path!r}, vocab={len(self)}, "
                f"special_tokens={self.special_tokens})")


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a checkpoint directory: `ep_jax.tokenizer.Tokenizer` on its tokenizer.json
    (no transformers import), or transformers' AutoTokenizer, imported only for directories whose
    tokenizer.json it would not use as is (e.g. a sentencepiece-only tokenizer.model)."""
    path = Path(path)
    if Tokenizer.supports(path):
        return Tokenizer.from_dir(path)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ProcessingError(f"{str(path)!r} has no tokenizer.json that ep_jax can read on its own",
                              fix="pip install transformers, or add the checkpoint's tokenizer.json") from None
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ProcessingError(f"cannot load a tokenizer from {str(path)!r} ({e}); the directory needs "
                              "tokenizer.json / tokenizer_config.json") from None


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (spaces before punctuation and contractions)."""
    return (
        text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",").replace(" ' ", "'")
        .replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s").replace(" 've", "'ve").replace(" 're", "'re")
    )
