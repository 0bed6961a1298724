"""`python -m ep_jax.eval vqa`: answer a LLaVA question file, as LLaVA's `model_vqa_loader`,
`model_vqa_science` and `model_vqa_mmbench` do, into the answers file its benchmark scripts
score (MME, TextVQA, POPE, GQA, VQAv2, VizWiz, ScienceQA, MMBench, ...).

Question files (`formats.py`): LLaVA's JSONL (`question_id` (int or string, unique), `text`
(the question as the benchmark words it, e.g. "...\\nAnswer the question using a single word
or phrase."), `image` (a path relative to `--image-folder`; absent for a text-only question),
optionally `category`), ScienceQA's JSON list of conversations, MMBench's TSV with base64
images. Answers file (JSONL): `question_id`, `prompt` (the question text), `text` (the answer),
`answer_id`, `model_id`, `metadata` (category, pruning, sampling); MMBench's adds `round_id`,
`options` and `option_char`.

Resumable: an existing answers file is continued. Questions already answered are skipped, and a
half-written last line (a crash while writing) is cut off before new lines are appended. Every
line is written and flushed as soon as its batch is done, so an interruption loses at most the
batch in flight. `--num-chunks N --chunk-idx K` answers the K-th of N contiguous chunks (LLaVA's
`split_list`), for one process per device; concatenate the chunk files afterwards.

Every flag and the whole question file (keys, duplicates, image files) is checked before the
model is loaded; errors follow `ep_jax.cli` (exit 2 and one `error:` line).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import uuid
from pathlib import Path

from ep_jax.cli import run_cli
from ep_jax.errors import InputError
from ep_jax.eval.formats import FORMATS, key_of, read_question_file

# generate's flags that make no sense for a question file (the questions and images come from it).
_NOT_FOR_EVAL = {"help", "image", "video", "fps", "prompt", "stream", "json", "explain", "raw_prompt"}


def generation_flags() -> argparse.ArgumentParser:
    """`python -m ep_jax.generate`'s model, sampling, template and pruning flags, as a parent
    parser (the same definitions, so both commands take the same flags)."""
    from ep_jax.cli.generate import build_parser

    p = build_parser()
    for action in [a for a in p._actions if a.dest in _NOT_FOR_EVAL]:
        p._remove_action(action)
        for s in action.option_strings:
            p._option_string_actions.pop(s, None)
        for group in p._action_groups + p._mutually_exclusive_groups:
            if action in group._group_actions:
                group._group_actions.remove(action)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ep_jax.eval", description="Evaluate ep_jax models on benchmarks.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    v = sub.add_parser(
        "vqa", parents=[generation_flags()], conflict_handler="resolve",
        help="answer a LLaVA question file (JSONL) into a LLaVA answers file",
        description="Answer a LLaVA question file (question_id, image, text[, category]) into an answers file "
        "(question_id, prompt, text, answer_id, model_id, metadata) that LLaVA's benchmark scripts score. "
        "Greedy by default; resumable.",
    )
    v.add_argument("--question-file", required=True,
                   help="LLaVA's question file: JSONL (question_id, image, text[, category]), ScienceQA's JSON "
                   "list or MMBench's TSV (see --question-format)")
    v.add_argument("--question-format", choices=("auto", *FORMATS), default="auto",
                   help="jsonl (model_vqa_loader), scienceqa (model_vqa_science), mmbench (model_vqa_mmbench); "
                   "auto: by the file's suffix (.tsv mmbench, .json scienceqa, else jsonl)")
    v.add_argument("--single-pred-prompt", action="store_true",
                   help="ScienceQA/MMBench: append \"Answer with the option's letter from the given choices directly.\"")
    v.add_argument("--all-rounds", action="store_true",
                   help="MMBench: ask each question once per rotation of its options (round_id)")
    v.add_argument("--lang", choices=("en", "cn"), default="en", help="MMBench: the language of --single-pred-prompt")
    v.add_argument("--image-folder", default=".", help="folder the questions' `image` paths are relative to")
    v.add_argument("--answers-file", required=True, help="JSONL to write; an existing one is continued")
    v.add_argument("--batch-size", type=int, default=8, help="questions per batch (the last one is padded)")
    v.add_argument("--num-chunks", type=int, default=1, help="split the questions into N contiguous chunks")
    v.add_argument("--chunk-idx", type=int, default=0, help="answer chunk K (0-based) of --num-chunks")
    v.add_argument("--model-id", default=None, help="`model_id` written per answer (default: the model folder name)")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    v.set_defaults(max_new_tokens=128)  # LLaVA's eval scripts' default
    return p


def main(argv=None) -> int:
    return run_cli(build_parser(), _run, argv)


# ---------------------------------------------------------------------- files
def check_images(questions: list[dict]) -> None:
    """Every image the run will read exists (its content is checked when its batch loads it)."""
    for q in questions:
        p = q["image"]
        if isinstance(p, Path) and not p.is_file():
            what = "is not a file" if p.exists() else "does not exist"
            raise InputError(f"{q['where']}: question {q['question_id']!r}: image {p} {what}",
                             fix="check --image-folder and the question's `image`")


def split_chunk(items: list, num_chunks: int, chunk_idx: int) -> list:
    """LLaVA's `get_chunk(split_list(...))`: contiguous chunks of ceil(len / N) items (the last
    ones may be shorter, or empty)."""
    size = math.ceil(len(items) / num_chunks)
    return items[chunk_idx * size:(chunk_idx + 1) * size]


def read_answers(path: Path) -> set[str]:
    """The question ids already answered in `path` (missing: none). Text after the last newline
    that is not a whole answer is a line cut short by a crash (each line is written with its
    newline in one write): once every other line has been read as an answer, it is cut off and
    that question is answered again. A bad complete line is an error naming it (nothing is cut)."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    done: set[str] = set()
    for n, raw in enumerate(data[:keep].split(b"\n")[:-1], 1):
        if raw.strip():
            done.add(_answered_id(raw, f"--answers-file {path}:{n}"))
    tail = data[keep:]
    if tail.strip():
        try:
            done.add(_answered_id(tail, ""))
            with open(path, "ab") as f:  # a whole answer without its newline (not written by us)
                f.write(b"\n")
        except InputError:
            with open(path, "r+b") as f:
                f.truncate(keep)
            print(f"ep_jax: {path}: cut off a half-written last line ({len(tail)} bytes) left by an "
                  "interrupted run", file=sys.stderr)
    return done


def _answered_id(raw: bytes, where: str) -> str:
    fix = "it is not an answers file: choose another --answers-file"
    try:
        a = json.loads(raw)
    except ValueError as e:
        raise InputError(f"{where} is not a JSON line ({e})", fix=fix) from None
    if not isinstance(a, dict) or "question_id" not in a:
        raise InputError(f"{where} has no question_id", fix=fix)
    return key_of(a["question_id"], a.get("round_id"))


# ---------------------------------------------------------------------- checks before loading
def check_args(args) -> None:
    from ep_jax.cli.generate import check_args as check_generation_args
    from ep_jax.files import check_output_file

    # generate's checks of the shared flags (sampling, pruning); its per-image flags do not apply
    check_generation_args(argparse.Namespace(**vars(args), image=["-"], prompt=["-"], stream=False, json=False,
                                             explain=None))
    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size}: need an int >= 1")
    if args.num_chunks < 1:
        raise InputError(f"--num-chunks {args.num_chunks}: need an int >= 1")
    if not 0 <= args.chunk_idx < args.num_chunks:
        raise InputError(f"--chunk-idx {args.chunk_idx}: need 0 <= K < --num-chunks ({args.num_chunks})")
    if not Path(args.image_folder).is_dir():
        raise InputError(f"--image-folder {args.image_folder} is not a folder")
    check_output_file(args.answers_file, "--answers-file")


# ---------------------------------------------------------------------- run
def _image(q: dict):
    """A question's images for run_generation: None, or a list of one RGB image."""
    from ep_jax.image_files import load_image

    if q["image"] is None:
        return None
    return [q["image"]() if callable(q["image"]) else load_image(q["image"])]


def answer_line(q: dict, text: str, model_id: str, settings: dict) -> dict:
    """One answers-file object, in the field order of LLaVA's scripts (MMBench's adds round_id,
    options and option_char)."""
    extra = dict(q["answer"])
    meta = dict(settings)
    if "category" in extra:
        meta["category"] = extra.pop("category")
    line = {"question_id": q["question_id"]}
    if "round_id" in extra:
        line["round_id"] = extra.pop("round_id")
    line.update({"prompt": q["prompt"], "text": text.strip(), **extra, "answer_id": uuid.uuid4().hex,
                 "model_id": model_id, "metadata": meta})
    return line


def _run(args) -> int:
    check_args(args)
    questions = read_question_file(Path(args.question_file), Path(args.image_folder), args.question_format,
                                   single_pred_prompt=args.single_pred_prompt, all_rounds=args.all_rounds,
                                   lang=args.lang)
    groups = set(split_chunk(list(dict.fromkeys(q["group"] for q in questions)), args.num_chunks, args.chunk_idx))
    chunk = [q for q in questions if q["group"] in groups]  # an MMBench row's rounds stay together
    answers_path = Path(args.answers_file)
    done = read_answers(answers_path)
    todo = [q for q in chunk if q["key"] not in done]
    check_images(todo)
    print(f"ep_jax: {len(chunk)} question(s) in chunk {args.chunk_idx}/{args.num_chunks}, "
          f"{len(chunk) - len(todo)} already answered in {answers_path}", file=sys.stderr)
    answers_path.parent.mkdir(parents=True, exist_ok=True)
    if not todo:
        answers_path.touch()
        return 0

    from tqdm import tqdm

    from ep_jax import checkpoint, presets
    from ep_jax.runtime.sharding import mesh_from_flag
    from ep_jax.cli.generate import describe_budget, prune_config
    from ep_jax.runtime.api import run_generation

    model_path = args.model
    if model_path is None:
        model_path = presets.default_model_path()
        print(f"using the shipped model {model_path} (pass --model for another)", file=sys.stderr)
    model = checkpoint.load(model_path, dtype=args.dtype, layout=args.layout, mesh=mesh_from_flag(args.mesh))
    prune = prune_config(args, model.preset, model.family)
    model_id = args.model_id or Path(os.path.abspath(model_path)).name
    settings = {
        "prune": None if prune is None else {"method": prune.method, "layer": prune.layer,
                                             "budget": describe_budget(prune)},
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
        "top_k": args.top_k, "seed": args.seed,
    }

    bar = tqdm(total=len(todo), unit="answer", file=sys.stderr, disable=args.no_progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    with open(answers_path, "a", encoding="utf-8") as out:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            # pad the last batch with repeats of its last question: one compiled batch size
            padded = batch + batch[-1:] * (args.batch_size - len(batch))
            images = [_image(q) for q in padded]
            gen = run_generation(model, images, [q["text"] for q in padded], max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                 seed=args.seed, prune=prune, template=args.template)
            for q, text in zip(batch, gen.texts):
                out.write(json.dumps(answer_line(q, text, model_id, settings), ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(batch))
    bar.close()
    elapsed = time.perf_counter() - t0
    print(f"ep_jax: wrote {len(todo)} answer(s) to {answers_path} in {elapsed:.1f} s "
          f"({len(todo) / max(elapsed, 1e-9):.2f} answers/s)", file=sys.stderr)
    return 0
