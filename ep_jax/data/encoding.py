"""Scene-QA samples -> training batches for the shipped model's recipe (`ep_jax/train.py`):
the tokenizer and preprocessor the recipe builds, the chat-formatted token rows (exactly what
`Processor.encode(..., template="llava_hf")` gives at inference), the extra questions asked as
later chat turns, and the per-patch targets of the auxiliary losses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ep_jax.data import scenes
from ep_jax.processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

TEMPLATE = "llava_hf"
IMAGE_TOKEN = "<image>"
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN)  # ids 0..4
IMAGE_SIZE = 224
PATCH = 16
GRID = IMAGE_SIZE // PATCH
COVERED = 0.15  # a patch belongs to an object when the object covers this much of it
AUX_CLASSES = {"color": len(scenes.COLORS) + 1, "shape": len(scenes.SHAPES) + 1, "center": 2,
               "quadrant": len(scenes.QUADRANTS) + 1}



# ---------------------------------------------------------------------------- tokenizer
def template_texts() -> list[str]:
    """Every prompt the model is trained on, formatted with the chat template, plus answers."""
    lines = []
    for q in scenes.tokenizer_corpus()[: -len(scenes.ANSWERS)]:
        for a in scenes.ANSWERS:
            lines.append(f"USER: {IMAGE_TOKEN}\n{q} ASSISTANT: {a}")
    return lines


def build_tokenizer(out_dir: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(scenes.tokenizer_corpus() + template_texts(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def write_preprocessor(out_dir: Path) -> None:
    d = {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": IMAGE_SIZE},
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_center_crop": True, "do_normalize": True, "do_resize": True, "do_rescale": True,
        "do_convert_rgb": True, "rescale_factor": 1 / 255, "resample": 3,
        "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
    }
    (out_dir / "preprocessor_config.json").write_text(json.dumps(d, indent=1) + "\n")


# ---------------------------------------------------------------------------- batches
class Encoder:
    """Question/answer -> token rows identical to `Processor.encode(template="llava_hf")`,
    answer + EOS appended, then `extra` further turns "USER: {q} ASSISTANT: {a}</s>" (the LLaVA
    conversation format); cached per question (the question set is closed)."""

    def __init__(self, processor, extra: int = 0):
        self.proc = processor
        self.extra = extra
        self.eos = processor.tokenizer.eos_token_id
        self._prompt: dict[str, list[int]] = {}
        self._turn: dict[str, list[int]] = {}
        self._answer: dict[str, list[int]] = {}
        corpus = scenes.tokenizer_corpus()
        questions, answers = corpus[: -len(scenes.ANSWERS)], scenes.ANSWERS
        self.max_answer = max(len(self.answer(a)) for a in answers)
        max_turn = max(len(self.turn(q)) for q in questions)
        self.single_len = max(len(self.prompt(q)) for q in questions) + self.max_answer
        self.seq_len = self.single_len + extra * (max_turn + self.max_answer)

    def prompt(self, q: str) -> list[int]:
        if q not in self._prompt:
            self._prompt[q] = self.proc.tokenize(self.proc.format(q, template=TEMPLATE))
        return self._prompt[q]

    def turn(self, q: str) -> list[int]:
        """A later turn's prompt (after the previous answer's EOS): no BOS, no image."""
        if q not in self._turn:
            text = self.proc.format(q, num_images=0, template=TEMPLATE)
            self._turn[q] = self.proc.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._turn[q]

    def answer(self, a: str) -> list[int]:
        if a not in self._answer:
            self._answer[a] = self.proc.tokenizer(" " + a, add_special_tokens=False)["input_ids"] + [self.eos]
        return self._answer[a]

    def batch(self, samples, extra: int | None = None) -> dict[str, np.ndarray]:
        extra = self.extra if extra is None else extra
        b, m = len(samples), self.max_answer * (1 + extra)
        if extra not in (0, self.extra):
            raise ValueError(f"extra={extra}: this encoder pads for 0 or {self.extra} extra questions")
        t = self.seq_len if extra else self.single_len
        ids = np.full((b, t), self.proc.pad_token_id, np.int32)
        mask = np.zeros((b, t), bool)
        pos = np.zeros((b, m), np.int32)  # rows whose logits predict the answer tokens
        labels = np.zeros((b, m), np.int32)
        weight = np.zeros((b, m), np.float32)
        starts = []  # per sample and turn: (answer slots, question, prompt start, prompt end)
        for i, s in enumerate(samples):
            starts.append([])
            row, k = [], 0
            for j, (question, answer) in enumerate([(s.question, s.answer)] + extra_questions(s, extra)):
                prompt = self.prompt(question) if j == 0 else self.turn(question)
                a = self.answer(answer)
                starts[-1].append((range(k, k + len(a) - 1), question, len(row), len(row) + len(prompt)))
                row += prompt
                pos[i, k : k + len(a)] = np.arange(len(row) - 1, len(row) - 1 + len(a))
                labels[i, k : k + len(a)] = a
                weight[i, k : k + len(a)] = 1.0
                row += a
                k += len(a)
            ids[i, : len(row)] = row
            mask[i, : len(row)] = True
        images = np.stack([s.image for s in samples])
        out = {"input_ids": ids, "attention_mask": mask, "images": images, "pos": pos,
               "labels": labels, "weight": weight}
        covers = [scenes.object_coverage(s.objects, IMAGE_SIZE, GRID) if s.objects else None for s in samples]
        out.update(patch_targets(samples, covers))
        out.update(self.attention_targets(samples, covers, ids, m, starts))
        return out

    def attention_targets(self, samples, covers, ids, m, starts) -> dict[str, np.ndarray]:
        """Target attentions [b, m, t] of the positions predicting each answer's tokens (not its
        EOS; `attn_on` [b, m] marks those; `starts[i]`: (answer slots, question, prompt start,
        prompt end) per turn): over the evidence (`attn_target`) and over the question's key
        words (`word_target`), see `Recipe.attn_weight`; other rows are zero."""
        b = len(samples)
        target = np.zeros((b, m, ids.shape[1]), np.float32)
        words = np.zeros((b, m, ids.shape[1]), np.float32)
        on = np.zeros((b, m), np.float32)
        image_id = self.proc.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        for i, s in enumerate(samples):
            image_rows = np.flatnonzero(ids[i] == image_id)
            for slots, question, lo, hi in starts[i]:
                w = np.zeros(ids.shape[1], np.float32)
                for word in scenes.key_words(question):
                    w[lo + _find(ids[i, lo:hi], self.word(word))] = 1.0
                hits, counting = scenes.referents(question, s.objects)
                t = np.zeros(ids.shape[1], np.float32)
                if counting or not hits:
                    t[0] = 1.0  # BOS
                for h in hits:
                    if counting:
                        t[image_rows[_centre_patch(s.objects[h])]] = 1.0
                    else:
                        t[image_rows[np.flatnonzero(covers[i][h].reshape(-1) >= COVERED)]] = 1.0
                target[i, slots], words[i, slots], on[i, slots] = t / t.sum(), w / w.sum(), 1.0
        return {"attn_target": target, "word_target": words, "attn_on": on}

    def word(self, w: str) -> list[int]:
        """Token ids of `w` inside a question (after a space)."""
        return self.proc.tokenizer(" " + w, add_special_tokens=False)["input_ids"]


def _find(row: np.ndarray, word: list[int]) -> np.ndarray:
    """Indices in `row` of the first occurrence of the token sequence `word`."""
    for j in range(len(row) - len(word) + 1):
        if list(row[j : j + len(word)]) == word:
            return np.arange(j, j + len(word))
    raise ValueError(f"tokens {word} not found in {row.tolist()}")


def extra_questions(sample, n: int) -> list[tuple[str, str]]:
    """`n` further questions about `sample`'s scene, deterministic per sample, none asked twice
    (nor the sample's own): a question type uniformly among those left, then yes/no evenly for
    existence, then one question uniformly. Fewer when the scene runs out of questions."""
    if n == 0:
        return []
    rng = np.random.default_rng([17, sample.seed, sample.index])
    pools: dict[str, list[tuple[str, str]]] = {}
    for q, a, qtype in scenes.scene_questions(sample.objects, sample.image.shape[0]):
        if q != sample.question:
            pools.setdefault(f"exist-{a}" if qtype == "exist" else qtype, []).append((q, a))
    out = []
    while len(out) < n and pools:
        kinds = sorted({k.split("-")[0] for k in pools})
        kind = kinds[rng.integers(len(kinds))]
        if kind == "exist":
            options = [k for k in ("exist-yes", "exist-no") if k in pools]
            kind = options[rng.integers(len(options))]
        out.append(pools[kind].pop(rng.integers(len(pools[kind]))))
        if not pools[kind]:
            del pools[kind]
    return out


def patch_targets(samples, covers=None) -> dict[str, np.ndarray]:
    """Per-patch labels [b, GRID*GRID] for the auxiliary loss: colour and shape of the object
    covering the patch (0 = none, else 1 + index into scenes.COLORS / SHAPES), the patch's
    quadrant on object patches (1 + index into scenes.QUADRANTS), and 1 where an object's centre
    lies (so counting reduces to counting flagged patches). `covers`: each sample's
    `scenes.object_coverage`, when already computed."""
    colors, shapes = list(scenes.COLORS), list(scenes.SHAPES)
    centres = (np.arange(GRID) + 0.5) * PATCH  # each patch's quadrant, from its centre
    quadrant = np.array([[1 + scenes.QUADRANTS.index(scenes.quadrant_of(x, y, IMAGE_SIZE)) for x in centres]
                         for y in centres])
    out = {f"aux_{k}": np.zeros((len(samples), GRID * GRID), np.int32) for k in AUX_CLASSES}
    for i, s in enumerate(samples):
        if not s.objects:
            continue
        cov = scenes.object_coverage(s.objects, IMAGE_SIZE, GRID) if covers is None else covers[i]
        best, on = cov.argmax(0), cov.max(0) >= COVERED
        color_of = np.array([1 + colors.index(o.color) for o in s.objects])
        shape_of = np.array([1 + shapes.index(o.shape) for o in s.objects])
        out["aux_color"][i] = np.where(on, color_of[best], 0).reshape(-1)
        out["aux_shape"][i] = np.where(on, shape_of[best], 0).reshape(-1)
        out["aux_quadrant"][i] = np.where(on, quadrant, 0).reshape(-1)
        out["aux_center"][i, [_centre_patch(o) for o in s.objects]] = 1
    return out


def _centre_patch(obj) -> int:
    """Row-major index of the patch that holds `obj`'s centre."""
    col, row = (min(int(c // PATCH), GRID - 1) for c in obj.center)
    return row * GRID + col
