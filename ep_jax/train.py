"""Train the small LLaVA shipped with ep_jax, from scratch, on the scene-VQA data.

    python -m ep_jax.train --out models/scenes-llava-tiny [--steps 2400] [--seed 0] [--minutes 60]

What it builds (everything here, nothing downloaded):
- a byte-level BPE tokenizer (`tokenizers`) trained on `scenes.tokenizer_corpus()` plus the chat
  template text, with <unk> <s> </s> <pad> <image> as special tokens (<image> is one id);
- a LLaVA architecture: CLIP-style ViT (224 px, 16 px patches -> 14x14 = 196 visual tokens),
  two-layer GELU MLP projector, LLaMA decoder (RMSNorm, RoPE, SwiGLU);
- teacher-forced training on `scenes.iterate("train", seed)`: the inputs are exactly what
  `Processor.encode(..., template="llava_hf")` produces at inference (same token ids, right
  padded), the loss covers the answer tokens and the EOS only; `extra_questions` more questions
  about the same scene follow as later chat turns;
- an auxiliary per-patch loss on the visual tokens (colour, shape, object centre), training only.

Validation accuracy is the greedy exact match computed with teacher forcing: a greedy decoder
emits `answer + EOS` iff the argmax at every answer position equals the target token, so the
teacher-forced "all argmax right" rate equals the generation accuracy, at the cost of one
forward pass. Beside it, each auxiliary head's accuracy on the patches an object covers shows
what the visual tokens already encode (colour, shape, object centres). Deterministic for a
fixed seed, step count, batch size and CPU thread count (`--minutes` is only a safety cap:
hitting it stops early and says so).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import queue
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ep_jax.config import LlavaConfig, TextConfig, VisionConfig
from ep_jax.data import scenes
from ep_jax.processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

TEMPLATE = "llava_hf"
IMAGE_TOKEN = "<image>"
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN)  # ids 0..4
IMAGE_SIZE = 224
PATCH = 16
GRID = IMAGE_SIZE // PATCH
COVERED = 0.15  # a patch belongs to an object when the object covers this much of it
AUX_CLASSES = {"color": len(scenes.COLORS) + 1, "shape": len(scenes.SHAPES) + 1, "center": 2}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of one training run (written to the model card)."""

    seed: int = 0
    steps: int = 2400
    batch: int = 12
    lr: float = 2e-3
    warmup: int = 100
    min_lr_frac: float = 0.05
    weight_decay: float = 0.05
    clip: float = 1.0
    vocab_size: int = 384
    vision_width: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_mlp: int = 384
    val_every: int = 300
    val_n: int = 150
    # Auxiliary per-patch loss (training only; the heads are dropped, the shipped model is a
    # plain LLaVA): from the visual tokens the decoder reads, predict the colour and shape of
    # the object covering each patch and whether an object's centre lies in it.
    aux_weight: float = 1.0
    aux_object_weight: float = 5.0  # patches on an object count this much more than background
    # Further questions about the same image, asked as later chat turns of the training sequence
    # (drawn from `scenes.scene_questions`): the image tokens, most of a sequence's cost, are
    # then paid once for several supervised answers. The first turn is the sample's own balanced
    # question in exactly the inference format; validation asks that one only.
    extra_questions: int = 4


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


def model_config(r: Recipe, tokenizer) -> LlavaConfig:
    vision = VisionConfig(
        hidden_size=r.vision_width, intermediate_size=4 * r.vision_width, num_layers=r.vision_layers,
        num_heads=r.vision_heads, image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act="quick_gelu",
    )
    text = TextConfig(
        vocab_size=len(tokenizer), hidden_size=r.text_width, intermediate_size=r.text_mlp,
        num_layers=r.text_layers, num_heads=r.text_heads, num_kv_heads=r.text_heads,
        head_dim=r.text_width // r.text_heads, max_position_embeddings=512,
    )
    return LlavaConfig(
        vision=vision, text=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        # The last ViT layer feeds the projector, so no layer is computed for nothing.
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


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
        for i, s in enumerate(samples):
            turns = [(self.prompt(s.question), s.answer)]
            turns += [(self.turn(q), a) for q, a in extra_questions(s, extra)]
            row, k = [], 0
            for prompt, answer in turns:
                a = self.answer(answer)
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
        out.update(patch_targets(samples))
        return out


def extra_questions(sample, n: int) -> list[tuple[str, str]]:
    """`n` further questions about `sample`'s scene, deterministic per sample: a question type
    uniformly among those the scene can answer, then yes/no evenly for existence, then one
    question uniformly."""
    if n == 0:
        return []
    rng = np.random.default_rng([17, sample.seed, sample.index])
    pools: dict[str, list[tuple[str, str]]] = {}
    for q, a, qtype in scenes.scene_questions(sample.objects, sample.image.shape[0]):
        pools.setdefault(f"exist-{a}" if qtype == "exist" else qtype, []).append((q, a))
    kinds = sorted({k.split("-")[0] for k in pools})
    out = []
    for _ in range(n):
        kind = kinds[rng.integers(len(kinds))]
        if kind == "exist":
            options = [k for k in ("exist-yes", "exist-no") if k in pools]
            kind = options[rng.integers(len(options))]
        pool = pools[kind]
        out.append(pool[rng.integers(len(pool))])
    return out


def patch_targets(samples) -> dict[str, np.ndarray]:
    """Per-patch labels [b, GRID*GRID] for the auxiliary loss: colour and shape of the object
    covering the patch (0 = none, else 1 + index into scenes.COLORS / SHAPES) and 1 where an
    object's centre lies (so counting reduces to counting flagged patches)."""
    colors, shapes = list(scenes.COLORS), list(scenes.SHAPES)
    out = {f"aux_{k}": np.zeros((len(samples), GRID, GRID), np.int32) for k in AUX_CLASSES}
    for i, s in enumerate(samples):
        if not s.objects:
            continue
        cov = scenes.object_coverage(s.objects, IMAGE_SIZE, GRID)
        best, on = cov.argmax(0), cov.max(0) >= COVERED
        color_of = np.array([1 + colors.index(o.color) for o in s.objects])
        shape_of = np.array([1 + shapes.index(o.shape) for o in s.objects])
        out["aux_color"][i] = np.where(on, color_of[best], 0)
        out["aux_shape"][i] = np.where(on, shape_of[best], 0)
        for o in s.objects:
            out["aux_center"][i, min(int(o.center[1] // PATCH), GRID - 1), min(int(o.center[0] // PATCH), GRID - 1)] = 1
    return {k: v.reshape(len(samples), -1) for k, v in out.items()}


def _producer(split: str, seed: int, start: int, batch: int, count: int, encoder: Encoder, out: queue.Queue):
    """Builds `count` batches in a thread; index-based sampling keeps the order deterministic."""
    for k in range(count):
        lo = start + k * batch
        out.put(encoder.batch([scenes.make_sample(split, i, seed, IMAGE_SIZE) for i in range(lo, lo + batch)]))
    out.put(None)


# ---------------------------------------------------------------------------- model functions
def normalize(images_u8: jax.Array) -> jax.Array:
    """uint8 [B, H, W, 3] -> CLIP-normalised float32 [B, 3, H, W] (what ImageProcessor gives
    for an image already at the model size, up to float rounding)."""
    x = images_u8.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(OPENAI_CLIP_MEAN, jnp.float32)) / jnp.asarray(OPENAI_CLIP_STD, jnp.float32)
    return x.transpose(0, 3, 1, 2)


def training_forward(graphdef, params, batch):
    """(answer logits [b, m, v], visual tokens [b, n, d]) in one pass (no KV cache)."""
    from flax import nnx

    from ep_jax.nn.llava import _causal, prompt_layout

    model = nnx.merge(graphdef, params)
    feats = model.image_features(normalize(batch["images"]))
    x = model.embed_inputs(batch["input_ids"], feats)
    valid, positions, rows = prompt_layout(batch["attention_mask"])
    h, *_ = model._run_segment(0, model.cfg.text.num_layers, x, positions, _causal(rows, valid), collect=False)
    h = jnp.take_along_axis(h, batch["pos"][..., None], axis=1)
    return model.logits(h), feats


def init_aux_heads(dim: int, seed: int) -> dict:
    key = jax.random.key(seed + 1)
    return {k: {"w": 0.02 * jax.random.normal(jax.random.fold_in(key, i), (dim, c)), "b": jnp.zeros(c)}
            for i, (k, c) in enumerate(AUX_CLASSES.items())}


def loss_fn(params, graphdef, batch, r: Recipe):
    """Answer cross-entropy (answer tokens + EOS) + `aux_weight` x the per-patch losses.
    Returns (total, answer loss)."""
    import optax

    logits, feats = training_forward(graphdef, params["model"], batch)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    w = batch["weight"]
    answer = jnp.sum(ce * w) / jnp.sum(w)
    if r.aux_weight == 0:
        return answer, answer
    aux = 0.0
    for k, head in params["aux"].items():
        target = batch[f"aux_{k}"]
        pw = jnp.where(target > 0, r.aux_object_weight, 1.0)
        patch_ce = optax.softmax_cross_entropy_with_integer_labels(feats @ head["w"] + head["b"], target)
        aux = aux + jnp.sum(patch_ce * pw) / jnp.sum(pw)
    return answer + r.aux_weight * aux, answer


def make_optimizer(r: Recipe):
    import optax

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, r.lr, r.warmup, max(r.steps, r.warmup + 1), end_value=r.lr * r.min_lr_frac
    )

    def decay_mask(params):  # no weight decay on norms, biases, embeddings of positions
        return jax.tree_util.tree_map_with_path(
            lambda path, a: a.ndim >= 2 and "pos" not in jax.tree_util.keystr(path), params
        )

    return optax.chain(
        optax.clip_by_global_norm(r.clip),
        optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=r.weight_decay, mask=decay_mask),
    ), schedule


def check(graphdef, params, batch):
    """Per example, whether greedy decoding would produce exactly answer + EOS; per auxiliary
    head, (right predictions, count) over the patches an object covers: what the visual tokens
    the decoder reads already encode."""
    logits, feats = training_forward(graphdef, params["model"], batch)
    hit = (jnp.argmax(logits, -1) == batch["labels"]) | (batch["weight"] == 0)
    aux = {}
    for k, head in params["aux"].items():
        target = batch[f"aux_{k}"]
        on = target > 0
        pred = jnp.argmax(feats @ head["w"] + head["b"], -1)
        aux[k] = (jnp.sum((pred == target) & on), jnp.sum(on))
    return jnp.all(hit, axis=-1), aux


def evaluate(check_fn, params, encoder: Encoder, samples, batch: int = 50) -> tuple[dict[str, float], dict[str, float]]:
    """(accuracy per question type, per-patch accuracy of each auxiliary head on object patches)."""
    ok, right, total = [], {k: 0 for k in AUX_CLASSES}, {k: 0 for k in AUX_CLASSES}
    for lo in range(0, len(samples), batch):
        chunk = samples[lo : lo + batch]
        b = encoder.batch(chunk, extra=0)  # the sample's own question, as at inference
        hits, aux = check_fn(params, b)
        ok.extend(np.asarray(hits).tolist())
        for k, (n_right, n) in aux.items():
            right[k] += int(n_right)
            total[k] += int(n)
    patches = {k: right[k] / max(total[k], 1) for k in AUX_CLASSES}
    return accuracy_table([s.qtype for s in samples], ok), patches


def accuracy_table(qtypes, ok) -> dict[str, float]:
    out = {"overall": float(np.mean(ok))}
    for t in scenes.QUESTION_TYPES:
        sel = [o for q, o in zip(qtypes, ok) if q == t]
        if sel:
            out[t] = float(np.mean(sel))
    return out


def fmt(acc: dict[str, float]) -> str:
    return " ".join(f"{k}={100 * v:.1f}" for k, v in acc.items())


# ---------------------------------------------------------------------------- training
def train(out: Path, r: Recipe, minutes: float | None = None, progress: bool = True, save: bool = True) -> dict:
    import optax
    from flax import nnx
    from tqdm import tqdm

    from ep_jax.checkpoint import init_model
    from ep_jax.processing import ImageProcessor, Processor

    t_start = time.time()
    out = Path(out)
    tokenizer = build_tokenizer(out, r.vocab_size)
    write_preprocessor(out)
    cfg = model_config(r, tokenizer)
    proc = Processor(tokenizer, ImageProcessor.from_dir(out), image_seq_len=cfg.image_seq_len)
    encoder = Encoder(proc, r.extra_questions)
    model = init_model(cfg, jnp.float32, seed=r.seed)
    graphdef, params = model.graphdef, model.state
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    print(f"model: {n_params / 1e6:.2f}M params, vocab {cfg.text.vocab_size}, seq {encoder.seq_len}, "
          f"{cfg.image_seq_len} visual tokens", file=sys.stderr)

    opt, schedule = make_optimizer(r)
    params = {"model": params, "aux": init_aux_heads(cfg.text.hidden_size, r.seed)}
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, graphdef, batch, r)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    check_fn = jax.jit(lambda p, b: check(graphdef, p, b))
    val = scenes.generate("val", r.val_n, seed=r.seed, image_size=IMAGE_SIZE)

    q: queue.Queue = queue.Queue(maxsize=4)
    threading.Thread(target=_producer, args=("train", r.seed, 0, r.batch, r.steps, encoder, q), daemon=True).start()

    history = []
    bar = tqdm(total=r.steps, disable=not progress, dynamic_ncols=True, file=sys.stderr)
    ema = None
    done = 0
    stopped_early = False
    for i in range(r.steps):
        batch = q.get()
        params, opt_state, loss = step(params, opt_state, batch)
        done = i + 1
        if i % 10 == 0 or done == r.steps:
            loss = float(loss)
            ema = loss if ema is None else 0.9 * ema + 0.1 * loss
            bar.set_postfix(loss=f"{ema:.3f}", lr=f"{float(schedule(i)):.1e}")
        bar.update(1)
        if done % r.val_every == 0 or done == r.steps:
            acc, patches = evaluate(check_fn, params, encoder, val)
            history.append({"step": done, "minutes": (time.time() - t_start) / 60, "loss": ema, "val": acc,
                            "val_patches": patches})
            bar.write(f"step {done}: loss {ema:.3f} val {fmt(acc)} | object patches {fmt(patches)} "
                      f"({(time.time() - t_start) / 60:.1f} min)")
        if minutes is not None and time.time() - t_start > 60 * minutes:
            stopped_early = True
            bar.write(f"stopping at step {done}: the {minutes}-minute cap was reached (run is not the full recipe)")
            break
    bar.close()
    if not history or history[-1]["step"] != done:
        acc, patches = evaluate(check_fn, params, encoder, val)
        history.append({"step": done, "minutes": (time.time() - t_start) / 60, "loss": ema, "val": acc,
                        "val_patches": patches})
    wall = time.time() - t_start
    result = {"recipe": dataclasses.asdict(r), "steps_done": done, "stopped_early": stopped_early,
              "wall_minutes": wall / 60, "params": n_params, "history": history, "val": history[-1]["val"]}
    if save:
        from ep_jax.checkpoint import save as save_ckpt

        save_ckpt(cfg, nnx.to_pure_dict(params["model"]), out, hf_config=cfg.to_hf_dict())
        (out / "train_log.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"trained {done} steps in {wall / 60:.1f} min; val {fmt(history[-1]['val'])}", file=sys.stderr)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ep_jax.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output checkpoint directory (e.g. models/scenes-llava-tiny)")
    p.add_argument("--seed", type=int, default=Recipe.seed)
    p.add_argument("--steps", type=int, default=Recipe.steps)
    p.add_argument("--batch", type=int, default=Recipe.batch)
    p.add_argument("--lr", type=float, default=Recipe.lr)
    p.add_argument("--minutes", type=float, default=None, help="safety cap on wall-clock minutes")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override another Recipe field (e.g. --set text_layers=4)")
    args = p.parse_args(argv)
    kw = {"seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr}
    types = {f.name: f.type for f in dataclasses.fields(Recipe)}
    for item in args.set:
        k, _, v = item.partition("=")
        if k not in types:
            p.error(f"--set {item!r}: unknown field; known: {sorted(types)}")
        kw[k] = float(v) if types[k] in ("float", float) else int(v)
    train(Path(args.out), Recipe(**kw), minutes=args.minutes, save=not args.no_save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
