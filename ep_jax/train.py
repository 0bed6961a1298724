"""Train the small LLaVA shipped with ep_jax, from scratch, on the scene-VQA data.

    python -m ep_jax.train --out models/scenes-llava-tiny [--steps 3300] [--seed 0] [--minutes 60]

What it builds (everything here, nothing downloaded):
- a byte-level BPE tokenizer (`tokenizers`) trained on `scenes.tokenizer_corpus()` plus the chat
  template text, with <unk> <s> </s> <pad> <image> as special tokens (<image> is one id);
- a LLaVA architecture: CLIP-style ViT (224 px, 16 px patches -> 14x14 = 196 visual tokens),
  two-layer GELU MLP projector, LLaMA decoder (RMSNorm, RoPE, SwiGLU);
- teacher-forced training on `scenes.iterate("train", seed)`: the inputs are exactly what
  `Processor.encode(..., template="llava_hf")` produces at inference (same token ids, right
  padded), the loss covers the answer tokens and the EOS only; `extra_questions` more questions
  about the same scene follow as later chat turns (batches: `ep_jax/data/encoding.py`);
- training-only supervision (dropped from the checkpoint, a plain LLaVA): a per-patch loss on
  the visual tokens (colour, shape, quadrant, object centre) and attention targets for head 0 of
  two decoder layers at the answer positions (the question's key words, then the patches of
  the objects asked about: `scenes.referents`);
- after training, accuracy on `test_n` test questions and a MODEL_CARD.md.

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

from ep_jax.cli import run_cli
from ep_jax.config import LlavaConfig, TextConfig, VisionConfig
from ep_jax.data import scenes
from ep_jax.data.encoding import (
    AUX_CLASSES, GRID, IMAGE_SIZE, IMAGE_TOKEN, PATCH, Encoder, build_tokenizer, write_preprocessor,
)
from ep_jax.processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

@dataclasses.dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of one training run (written to the model card)."""

    seed: int = 0
    steps: int = 3300
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
    test_n: int = 500  # test-split questions scored after training (model card)
    # Auxiliary per-patch loss (training only; the heads are dropped, the shipped model is a
    # plain LLaVA): from the visual tokens the decoder reads, predict the colour, shape and
    # quadrant of the object covering each patch and whether an object's centre lies in it.
    aux_weight: float = 1.0
    aux_object_weight: float = 5.0  # patches on an object count this much more than background
    # Further questions about the same image, asked as later chat turns of the training sequence
    # (drawn from `scenes.scene_questions`): the image tokens, most of a sequence's cost, are
    # then paid once for several supervised answers. The first turn is the sample's own balanced
    # question in exactly the inference format; validation asks that one only.
    extra_questions: int = 4
    # Attention supervision (training only): at the positions that predict an answer's tokens,
    # head 0 of decoder layer `attn_layer` is trained towards the evidence (`scenes.referents`):
    # the patches of the object asked about; for a count, each counted object's centre patch
    # and the BOS token (the share left to BOS tells how many); BOS alone when nothing matches.
    # The first hop is supervised the same way: head 0 of layer `word_attn_layer` at those
    # positions is trained towards the question's key words (colour, shape, "objects").
    attn_weight: float = 1.0
    attn_layer: int = 1
    word_attn_layer: int = 0
    # The ViT's (learned) position embeddings start as 2-D sine-cosine codes instead of noise,
    # so where a patch lies (a position question's answer) is readable from the first step.
    sincos_positions: int = 1


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


def training_forward(graphdef, params, batch, attn_layers: tuple[int, ...] = ()):
    """(answer logits [b, m, v], visual tokens [b, n, d], {layer: log attention [b, m, t] of
    head 0 at the answer positions} for the decoder layers in `attn_layers`) in one pass (no
    KV cache)."""
    from flax import nnx

    from ep_jax.runtime.prefill import causal_mask, run_segment, sequence_rows

    model = nnx.merge(graphdef, params)
    feats = model.image_features(normalize(batch["images"]))
    x = model.merge(batch["input_ids"], feats)
    positions = model.embed_inputs({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})[1]
    valid = batch["attention_mask"].astype(bool)
    mask = causal_mask(sequence_rows(valid), valid)
    log_attn, h, done = {}, x, 0
    for layer in sorted(set(attn_layers)):  # run up to each supervised layer, read its head 0
        if layer > done:
            h, *_ = run_segment(model, done, layer, h, positions, mask)
        done = layer
        log_attn[layer] = _head0_log_attention(model, layer, h, positions, mask, batch["pos"])
    h, *_ = run_segment(model, done, model.cfg.text.num_layers, h, positions, mask)
    h = jnp.take_along_axis(h, batch["pos"][..., None], axis=1)
    return model.logits(h), feats, log_attn


def _head0_log_attention(model, layer_index, h, positions, mask, rows):
    """Log-softmax attention [b, m, t] of query head 0 of one decoder layer, for the queries at
    `rows` [b, m] (exactly what that layer computes there; kv head 0 serves query head 0)."""
    from flax import nnx

    graphdef, state = nnx.split(model.layers)
    layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[layer_index], state))
    q, k, _, _ = layer.qkv(h, positions)
    q = jnp.take_along_axis(q[:, :, 0], rows[..., None], axis=1)  # [b, m, hd]
    logits = jnp.einsum("bmh,bth->bmt", q, k[:, :, 0], preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    row_mask = jnp.take_along_axis(mask, rows[..., None], axis=1)
    return jax.nn.log_softmax(jnp.where(row_mask, logits, -1e30), axis=-1)


def init_aux_heads(dim: int, seed: int) -> dict:
    key = jax.random.key(seed + 1)
    return {k: {"w": 0.02 * jax.random.normal(jax.random.fold_in(key, i), (dim, c)), "b": jnp.zeros(c)}
            for i, (k, c) in enumerate(AUX_CLASSES.items())}


def sincos_positions(grid: int, dim: int) -> np.ndarray:
    """[1 + grid*grid, dim] 2-D sine-cosine position codes (MAE-style; half the channels
    encode the row, half the column), the CLS row zero."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    parts = [f(c.reshape(-1, 1) * omega) for c in (rows, cols) for f in (np.sin, np.cos)]
    codes = np.zeros((1 + grid * grid, dim), np.float32)
    codes[1:, : 4 * quarter] = np.concatenate(parts, axis=1)
    return codes


def loss_fn(params, graphdef, batch, r: Recipe):
    """Answer cross-entropy (answer tokens + EOS) + `attn_weight` x the attention loss +
    `aux_weight` x the per-patch losses. Returns (total, (answer loss, attention loss))."""
    import optax

    layers = (r.attn_layer, r.word_attn_layer) if r.attn_weight else ()
    logits, feats, log_attn = training_forward(graphdef, params["model"], batch, layers)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    w = batch["weight"]
    answer = jnp.sum(ce * w) / jnp.sum(w)
    attn = jnp.zeros(())
    if r.attn_weight:
        on = batch["attn_on"]
        for target, layer in ((batch["attn_target"], r.attn_layer), (batch["word_target"], r.word_attn_layer)):
            logp = log_attn[layer]
            attn_ce = -jnp.sum(jnp.where(target > 0, target * logp, 0.0), axis=-1)
            attn = attn + jnp.sum(attn_ce * on) / jnp.maximum(jnp.sum(on), 1.0)
    total = answer + r.attn_weight * attn
    if r.aux_weight == 0:
        return total, (answer, attn)
    aux = 0.0
    for k, head in params["aux"].items():
        target = batch[f"aux_{k}"]
        pw = jnp.where(target > 0, r.aux_object_weight, 1.0)
        patch_ce = optax.softmax_cross_entropy_with_integer_labels(feats @ head["w"] + head["b"], target)
        aux = aux + jnp.sum(patch_ce * pw) / jnp.sum(pw)
    return total + r.aux_weight * aux, (answer, attn)


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
    logits, feats, _ = training_forward(graphdef, params["model"], batch)
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
    ok, right, total = [], {}, {}
    for lo in range(0, len(samples), batch):
        chunk = samples[lo : lo + batch]
        b = encoder.batch(chunk, extra=0)  # the sample's own question, as at inference
        hits, aux = check_fn(params, b)
        ok.extend(np.asarray(hits).tolist())
        for k, (n_right, n) in aux.items():
            right[k] = right.get(k, 0) + int(n_right)
            total[k] = total.get(k, 0) + int(n)
    patches = {k: right[k] / max(total[k], 1) for k in right}
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

    from ep_jax.families.llava import FAMILY
    from ep_jax.runtime.model import init_model
    from ep_jax.processing import ImageProcessor, Processor

    t_start = time.time()
    out = Path(out)
    tokenizer = build_tokenizer(out, r.vocab_size)
    write_preprocessor(out)
    cfg = model_config(r, tokenizer)
    proc = Processor(tokenizer, ImageProcessor.from_dir(out), image_seq_len=cfg.image_seq_len)
    encoder = Encoder(proc, r.extra_questions)
    model = init_model(FAMILY, cfg, jnp.float32, seed=r.seed)
    graphdef, params = model.graphdef, model.state
    if r.sincos_positions:
        params["vision"]["pos"][...] = jnp.asarray(sincos_positions(GRID, cfg.vision.hidden_size))
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    print(f"model: {n_params / 1e6:.2f}M params, vocab {cfg.text.vocab_size}, seq {encoder.seq_len}, "
          f"{cfg.image_seq_len} visual tokens", file=sys.stderr)

    opt, schedule = make_optimizer(r)
    params = {"model": params, "aux": init_aux_heads(cfg.text.hidden_size, r.seed)}
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, graphdef, batch, r)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, losses

    check_fn = jax.jit(lambda p, b: check(graphdef, p, b))
    val = scenes.generate("val", r.val_n, seed=r.seed, image_size=IMAGE_SIZE)

    q: queue.Queue = queue.Queue(maxsize=4)
    threading.Thread(target=_producer, args=("train", r.seed, 0, r.batch, r.steps, encoder, q), daemon=True).start()

    history = []
    bar = tqdm(total=r.steps, disable=not progress, dynamic_ncols=True, file=sys.stderr)
    ema = attn_ema = None
    done = 0
    stopped_early = False
    for i in range(r.steps):
        batch = q.get()
        params, opt_state, (loss, attn_loss) = step(params, opt_state, batch)
        done = i + 1
        if i % 10 == 0 or done == r.steps:
            loss, attn_loss = float(loss), float(attn_loss)
            ema = loss if ema is None else 0.9 * ema + 0.1 * loss
            attn_ema = attn_loss if attn_ema is None else 0.9 * attn_ema + 0.1 * attn_loss
            bar.set_postfix(loss=f"{ema:.3f}", attn=f"{attn_ema:.2f}", lr=f"{float(schedule(i)):.1e}")
        bar.update(1)
        if done % r.val_every == 0 or done == r.steps:
            acc, patches = evaluate(check_fn, params, encoder, val)
            history.append({"step": done, "minutes": (time.time() - t_start) / 60, "loss": ema,
                            "attn_loss": attn_ema, "val": acc, "val_patches": patches})
            bar.write(f"step {done}: loss {ema:.3f} attention {attn_ema:.2f} val {fmt(acc)} | object patches {fmt(patches)} "
                      f"({(time.time() - t_start) / 60:.1f} min)")
        if minutes is not None and time.time() - t_start > 60 * minutes:
            stopped_early = True
            bar.write(f"stopping at step {done}: the {minutes}-minute cap was reached (run is not the full recipe)")
            break
    bar.close()
    if not history or history[-1]["step"] != done:
        acc, patches = evaluate(check_fn, params, encoder, val)
        history.append({"step": done, "minutes": (time.time() - t_start) / 60, "loss": ema,
                        "attn_loss": attn_ema, "val": acc, "val_patches": patches})
    wall = time.time() - t_start
    result = {"recipe": dataclasses.asdict(r), "steps_done": done, "stopped_early": stopped_early,
              "wall_minutes": wall / 60, "params": n_params, "history": history, "val": history[-1]["val"]}
    print(f"trained {done} steps in {wall / 60:.1f} min; val {fmt(history[-1]['val'])}", file=sys.stderr)
    if r.test_n:
        test = scenes.generate("test", r.test_n, seed=r.seed, image_size=IMAGE_SIZE)
        result["test"], _ = evaluate(check_fn, params, encoder, test)
        print(f"test ({r.test_n} questions): {fmt(result['test'])}", file=sys.stderr)
    if save:
        from ep_jax.checkpoint import save as save_ckpt

        # out/ already holds the tokenizer and preprocessor written above (copied along), and a
        # shipped model's preset.json, which stays.
        save_ckpt(cfg, nnx.to_pure_dict(params["model"]), out, src=out, hf_config=cfg.to_hf_dict(),
                  overwrite=True, keep=("preset.json",), family="llava")
        (out / "train_log.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "MODEL_CARD.md").write_text(model_card(out.name, result, cfg))
    return result


def model_card(name: str, result: dict, cfg: LlavaConfig) -> str:
    """The model card: task, architecture, the exact training command, accuracy per type."""
    r, v, t = Recipe(**result["recipe"]), cfg.vision, cfg.text
    defaults = dataclasses.asdict(Recipe())
    changed = " ".join(f"--set {k}={val}" for k, val in dataclasses.asdict(r).items() if val != defaults[k])
    cols = ["overall", *scenes.QUESTION_TYPES]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    row = lambda acc: "| " + " | ".join(f"{100 * acc[c]:.1f}" for c in cols) + " |\n"  # noqa: E731
    val_rows = "".join(f"| {h['step']} | {h['minutes']:.1f} | {h['loss']:.3f} " + row(h["val"])
                       for h in result["history"])
    test = (f"## Test accuracy (unpruned, greedy exact match, {r.test_n} test-split questions)\n\n"
            + head + row(result["test"]) + "\n") if "test" in result else ""
    return f"""# {name}

A small LLaVA-architecture vision-language model trained **from scratch** by `ep_jax.train` on the
synthetic scene-VQA task of `ep_jax.data.scenes` (flat-coloured shapes over toned-down crops of
real photos; one-word answers; train/val/test use disjoint photos). It is the model
`python -m ep_jax.generate` uses when no `--model` is given, and the test bed of the pruning
quality benchmark (`python -m ep_jax.bench quality`).

{test}## Task
Five question types, balanced: `color` ("What color is the star?"), `shape` ("What shape is the
red object?"), `count` ("How many circles are there?" / "How many objects are there?", 0-6),
`exist` ("Is there a blue square?", yes/no), `position` ("In which quadrant is the green
triangle?", top-left/top-right/bottom-left/bottom-right).

## Architecture ({result['params'] / 1e6:.2f}M parameters, float32)
- Vision: CLIP ViT, {v.image_size} px, {v.patch_size} px patches -> **{cfg.image_seq_len} visual tokens**, width
  {v.hidden_size}, {v.num_layers} layers, {v.num_heads} heads, quick_gelu; features from the last layer, CLS dropped.
- Projector: Linear-GELU-Linear ({v.hidden_size} -> {t.hidden_size}).
- Decoder: LLaMA, width {t.hidden_size}, {t.num_layers} layers, {t.num_heads} heads, SwiGLU {t.intermediate_size}, RoPE, vocab {t.vocab_size}.
- Tokenizer: byte-level BPE trained here with `tokenizers`; `<image>` is one token.
- Chat template `llava_hf`: `USER: <image>\\n{{question}} ASSISTANT:`.

## Training
`python -m ep_jax.train --out models/{name}{(' ' + changed) if changed else ''}` (recipe in `train_log.json`):
{result['steps_done']} steps x batch {r.batch} fresh scenes, each with its own question plus {r.extra_questions} more
as later chat turns; AdamW (lr {r.lr}, warmup {r.warmup}, cosine), teacher forcing, loss on the answers.
Training-only supervision, dropped from the checkpoint (a plain LLaVA): per-patch heads on the
visual tokens (colour, shape, quadrant, object centre) and, at the positions that
predict an answer, attention targets for head 0 of decoder layers {r.word_attn_layer} (the question's key
words) and {r.attn_layer} (the patches of the objects asked about).
Wall time: **{result['wall_minutes']:.1f} min** on the machine that ran it{' (stopped early by --minutes)' if result['stopped_early'] else ''}.
Deterministic for a fixed seed, step count, batch and CPU thread count.

Validation during training (150 val-split questions, so about +-9 points per type):

| step | min | loss | {' | '.join(cols)} |
|---|---|---|{'---|' * len(cols)}
{val_rows}"""


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
    return run_cli(p, lambda args: _run(p, args), argv)


def _run(p: argparse.ArgumentParser, args) -> int:
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
