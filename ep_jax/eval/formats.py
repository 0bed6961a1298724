"""The question files of LLaVA's evaluation scripts, read into one list of questions.

- `jsonl` (`model_vqa_loader.py`: MME, TextVQA, GQA, POPE, VQAv2, VizWiz, MM-Vet, ...): one
  object a line with `question_id`, `text`, optional `image` (relative to --image-folder) and
  `category`.
- `scienceqa` (`model_vqa_science.py`, e.g. `llava_test_CQM-A.json`): one JSON list of
  `{"id", "conversations": [{"from": "human", "value": "<image>\\n..."}, ...], "image"?}`; the
  human turn is the question, `<image>` removed; with --single-pred-prompt the letter instruction
  is appended.
- `mmbench` (`model_vqa_mmbench.py`, e.g. `mmbench_dev_20230712.tsv`): a TSV with `index`,
  `question`, `hint`, options `A`..`D` (the first empty one ends them), `image` (base64) and
  optionally `category`; the hint goes before the question, the options after it as "A. ...";
  with --all-rounds each question is asked once per rotation of its options (`round_id`).

Every reader returns dicts with: `question_id`, `text` (what the model is asked), `prompt` (what
the answers file records, as the LLaVA script writes it), `image` (a path, a zero-argument
callable giving the image, or None), `key` (unique per answer, for resuming), `group` (the unit
--num-chunks splits: a question, or an MMBench row with all its rounds), `where` (FILE:LINE for
messages) and `answer` (extra answer fields: `round_id`, `options`, `option_char`; and the
`metadata` category). All checks happen here, before a model is loaded (image files are
opened when their batch is answered; MMBench images are checked to be images here).
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Callable

from ep_jax.errors import InputError

FORMATS = ("jsonl", "scienceqa", "mmbench")
LETTER_PROMPT = "Answer with the option's letter from the given choices directly."
LETTER_PROMPT_CN = "请直接回答选项字母。"
OPTION_CHARS = ("A", "B", "C", "D")


def key_of(qid, round_id: int | None = None) -> str:
    """Question ids compare as their JSON text (1 and "1" are different ids, as in LLaVA); an
    MMBench answer is keyed by (index, round_id)."""
    return json.dumps(qid) if round_id is None else json.dumps([qid, round_id])


def guess_format(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".tsv": "mmbench", ".json": "scienceqa"}.get(suffix, "jsonl")


def read_question_file(path: Path, image_folder: Path, fmt: str = "auto", *, single_pred_prompt: bool = False,
                       all_rounds: bool = False, lang: str = "en") -> list[dict]:
    if not path.is_file():
        raise InputError(f"--question-file {path}: no such file" if not path.exists() else
                         f"--question-file {path} is not a file")
    fmt = guess_format(path) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise InputError(f"--question-format {fmt!r}: use one of auto, {', '.join(FORMATS)}")
    if fmt != "mmbench" and (all_rounds or lang != "en"):
        raise InputError(f"--all-rounds and --lang apply to MMBench question files, not {fmt}")
    if fmt == "jsonl" and single_pred_prompt:
        raise InputError("--single-pred-prompt applies to ScienceQA and MMBench question files, not jsonl",
                         fix="a JSONL question file words its own instructions in `text`")
    text = _read_text(path)
    if fmt == "jsonl":
        questions = read_jsonl(path, text, image_folder)
    elif fmt == "scienceqa":
        questions = read_scienceqa(path, text, image_folder, single_pred_prompt)
    else:
        questions = read_mmbench(path, text, single_pred_prompt, all_rounds, lang)
    if not questions:
        raise InputError(f"--question-file {path} holds no questions")
    seen: dict[str, str] = {}
    for q in questions:
        if q["key"] in seen:
            raise InputError(f"{q['where']}: question id {q['question_id']!r} repeats {seen[q['key']]}",
                             fix="question ids must be unique (answers are matched to questions by id)")
        seen[q["key"]] = q["where"]
    return questions


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"--question-file {path} is not UTF-8 text ({e})") from None


def _question(qid, text: str, where: str, *, prompt: str | None = None, image=None, round_id: int | None = None,
              **answer: Any) -> dict:
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise InputError(f"{where}: question id {qid!r} must be an int or a string")
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{where}: the question text must be a non-empty string, got {text!r:.60}")
    if round_id is not None:
        answer["round_id"] = round_id
    return {"question_id": qid, "text": text, "prompt": text if prompt is None else prompt, "image": image,
            "key": key_of(qid, round_id), "group": key_of(qid), "where": where, "answer": answer}


def _image_path(value, where: str, image_folder: Path) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InputError(f"{where}: image must be a file name, got {value!r:.60}")
    return image_folder / value


# ---------------------------------------------------------------------- jsonl
def read_jsonl(path: Path, text: str, image_folder: Path) -> list[dict]:
    questions = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})",
                             fix="each line must be one JSON object (a ScienceQA .json list: "
                             "--question-format scienceqa)") from None
        if not isinstance(q, dict):
            raise InputError(f"{where}: a JSON {type(q).__name__}, not an object")
        missing = [k for k in ("question_id", "text") if k not in q]
        if missing:
            raise InputError(f"{where}: missing key(s) {', '.join(missing)}",
                             fix="each question needs question_id, text and (for an image question) image")
        extra = {"category": q["category"]} if "category" in q else {}
        questions.append(_question(q["question_id"], q["text"], where,
                                   image=_image_path(q.get("image"), where, image_folder), **extra))
    return questions


# ---------------------------------------------------------------------- ScienceQA
def read_scienceqa(path: Path, text: str, image_folder: Path, single_pred_prompt: bool) -> list[dict]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})",
                         fix="a ScienceQA question file is one JSON list (LLaVA's llava_test_CQM-A.json)") from None
    if not isinstance(items, list):
        raise InputError(f"--question-file {path}: a JSON {type(items).__name__}, not a list of questions")
    questions = []
    for i, item in enumerate(items):
        where = f"{path}: item {i}"
        if not isinstance(item, dict) or "id" not in item:
            raise InputError(f"{where}: each item must be an object with id and conversations")
        turns = item.get("conversations")
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict) \
                or not isinstance(turns[0].get("value"), str):
            raise InputError(f"{where}: conversations[0].value (the question) is missing")
        qs = turns[0]["value"].replace("<image>", "").strip()
        if single_pred_prompt:
            qs = qs + "\n" + LETTER_PROMPT
        image = _image_path(item.get("image"), where, image_folder)
        # the recorded prompt starts with "<image>\n" for an image question, as LLaVA's (its
        # eval_science_qa.py counts multimodal questions by it); the chat template places the image
        questions.append(_question(item["id"], qs, where, prompt=("<image>\n" if image else "") + qs, image=image))
    return questions


# ---------------------------------------------------------------------- MMBench
# pandas' default NA strings: LLaVA reads the TSV with pd.read_table, which turns these into NaN
_PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
              "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


def _blank(value) -> bool:
    """LLaVA's is_none after pandas: a missing cell, one of pandas' NA strings, or 'nan' /
    'none' in any case."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or \
        (isinstance(value, str) and (value in _PANDAS_NA or value.lower() in ("nan", "none")))


def read_mmbench(path: Path, text: str, single_pred_prompt: bool, all_rounds: bool, lang: str) -> list[dict]:
    csv.field_size_limit(1 << 30)  # base64 images are long cells
    reader = csv.DictReader(io.StringIO(text), delimiter="\t")
    rows = []
    for row in reader:
        rows.append((f"{path}:{reader.line_num}", row))
    if not rows:
        return []
    missing = [k for k in ("index", "question", "image", "A", "B") if k not in reader.fieldnames]
    if missing:
        raise InputError(f"--question-file {path}: the TSV header lacks {', '.join(missing)}",
                         fix="an MMBench file has the columns index, question, hint, A, B, C, D, image")
    images = {}
    for where, row in rows:
        if None in row.values() or None in row:  # DictReader: a short row's missing cells, a long row's extra
            cells = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or ())
            raise InputError(f"{where}: the row has {cells} cells for {len(reader.fieldnames)} columns",
                             fix="each row needs one tab-separated cell per header column")
        images[row["index"]] = row["image"]
    questions = []
    for where, row in rows:
        options = []
        for c in OPTION_CHARS:
            if _blank(row.get(c)):
                break
            options.append(row[c])
        if len(options) < 2:
            raise InputError(f"{where}: question {row['index']!r} has fewer than two options")
        qid = int(row["index"]) if row["index"].strip().lstrip("-").isdigit() else row["index"]
        image = _base64_image(_image_cell(row, images, where), where)
        chars = list(OPTION_CHARS[:len(options)])
        for round_id in range(len(options) if all_rounds else 1):
            question = row["question"] if _blank(row.get("hint")) else row["hint"] + "\n" + row["question"]
            for c, option in zip(OPTION_CHARS, options):  # the letters stay in order; the options rotate
                question = question + "\n" + c + ". " + option
            qs = question + ("\n" + (LETTER_PROMPT_CN if lang == "cn" else LETTER_PROMPT) if single_pred_prompt
                             else "")
            extra = {} if _blank(row.get("category")) else {"category": row["category"]}
            questions.append(_question(qid, qs, where, prompt=question, image=image, round_id=round_id,
                                       options=list(options), option_char=list(chars), **extra))
            options, chars = options[1:] + options[:1], chars[1:] + chars[:1]
    return questions


def _image_cell(row: dict, images: dict, where: str) -> str:
    """The row's base64 image; a short all-digit cell names the row whose image it shares (as in
    VLMEvalKit's TSVs, which store a repeated image once)."""
    cell = row["image"].strip()
    if len(cell) < 64 and cell.isdigit():
        if cell not in images or len(images[cell].strip()) < 64:
            raise InputError(f"{where}: the image cell {cell!r} names no row with an image")
        return images[cell]
    return cell


def _base64_image(data: str, where: str) -> Callable[[], Any]:
    """The cell checked as base64 now; decoded to an image when its batch is answered."""
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{where}: the image cell is not base64 image data") from None
    if not raw:
        raise InputError(f"{where}: the image cell is empty")
    import PIL.Image

    try:
        PIL.Image.open(io.BytesIO(raw))  # reads the header only; the pixels are decoded with the batch
    except Exception as e:  # noqa: BLE001 - any decoder refusal is a bad input
        raise InputError(f"{where}: the image cell's bytes are not an image ({type(e).__name__})") from None

    def load():
        from ep_jax.errors import ProcessingError
        from ep_jax.image_files import load_image

        try:
            im = PIL.Image.open(io.BytesIO(raw))
        except Exception as e:  # noqa: BLE001 - any decoder refusal is a bad input
            raise ProcessingError(f"{where}: the image cell's bytes are not an image ({type(e).__name__})") from None
        return load_image(im)

    return load
