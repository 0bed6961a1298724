"""An independent PyTorch reference of the released EntropyPrune algorithm (docs/ALGORITHM.md),
run on Hugging Face's LlavaForConditionalGeneration: decoder layers one by one, layer K-1's
queries scored in float64, top-R visual tokens gathered in original order, later layers run
with position ids = the kept (original) positions. Batch size 1, no KV cache: generation
recomputes the whole sequence each step, which is what a cache computes.
Test-only; shares no code with ep_jax.
"""

from __future__ import annotations

import math

import torch


def token_entropy_f64(q: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[n, H*d] -> [n]: centre over heads, dual Gram Z Z^T / H, clamp 1e-10, -sum l ln l / ln H."""
    n, width = q.shape
    z = q.double().reshape(n, num_heads, width // num_heads)
    d = z.shape[-1]
    if d > 128:
        z = z.reshape(n, num_heads, 128, d // 128).mean(-1)
    z = z - z.mean(dim=1, keepdim=True)
    gram = z @ z.transpose(1, 2) / num_heads
    lam = torch.linalg.eigvalsh(gram).clamp_min(1e-10)
    return -(lam * lam.log()).sum(-1) / math.log(num_heads)


def _merge_image(tm, input_ids, pixel_values, **image_kw):
    emb = tm.get_input_embeddings()(input_ids)
    feats = tm.model.get_image_features(pixel_values=pixel_values, **image_kw)
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    feats = torch.cat(list(feats), 0) if isinstance(feats, (list, tuple)) else feats.reshape(-1, emb.shape[-1])
    mask = input_ids == tm.config.image_token_id
    emb = emb.clone()
    emb[mask] = feats.to(emb.dtype)
    return emb


@torch.no_grad()
def pruned_forward(tm, input_ids, pixel_values, layer: int, keep: int, *, stable_ties: bool = False, **image_kw):
    """Logits [1, S', V] of the kept rows and the kept positions [S'] (batch of one). `image_kw`:
    further arguments of the model's get_image_features (LLaVA-NeXT: image_sizes); all of an
    image's tokens (LLaVA-NeXT: base, tiles and newlines) compete in the one top-R.
    `stable_ties`: equal scores keep the earlier token (LLaVA-NeXT's newline tokens all score the
    same at K = 1; torch.topk leaves their order unspecified)."""
    lm = tm.model.language_model
    h = _merge_image(tm, input_ids, pixel_values, **image_kw)
    s = h.shape[1]
    pos = torch.arange(s)[None]
    is_visual = (input_ids[0] == tm.config.image_token_id)
    num_heads = lm.config.num_attention_heads
    kept = torch.arange(s)
    for i, block in enumerate(lm.layers):
        if i == layer:
            q = block_prev.self_attn.q_proj(block_prev.input_layernorm(h_prev))[0]  # noqa: F821
            visual = torch.nonzero(is_visual).flatten()
            scores = token_entropy_f64(q[visual], num_heads)
            order = torch.argsort(-scores, stable=True)[:keep] if stable_ties else torch.topk(scores, keep).indices
            top = visual[order]
            kept = torch.sort(torch.cat([torch.nonzero(~is_visual).flatten(), top])).values
            h, pos = h[:, kept], pos[:, kept]
        n = h.shape[1]
        causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
        pe = lm.rotary_emb(h, pos)
        h_prev, block_prev = h, block
        h = block(h, attention_mask=causal, position_ids=pos, position_embeddings=pe)
    return tm.lm_head(lm.norm(h)), kept


@torch.no_grad()
def pruned_greedy(tm, input_ids, pixel_values, layer: int, keep: int, steps: int) -> list[int]:
    """Greedy tokens; the pruning decision is made on the prompt (text tokens never pruned)."""
    ids = input_ids
    out = []
    for _ in range(steps):
        logits, _ = pruned_forward(tm, ids, pixel_values, layer, keep)
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        ids = torch.cat([ids, torch.tensor([[tok]])], 1)
    return out


def _qwen_embeddings(tm, input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw):
    """Token embeddings with the vision tower's merged features scattered into the image and
    video pad positions, as Qwen2_5_VLModel.forward does."""
    emb = tm.get_input_embeddings()(input_ids).clone()
    for pixels, grid, token in ((pixel_values, image_grid_thw, tm.config.image_token_id),
                                (pixel_values_videos, video_grid_thw, tm.config.video_token_id)):
        if pixels is None:
            continue
        feats = tm.model.visual(pixels.to(tm.model.visual.dtype), grid_thw=grid).pooler_output
        emb[input_ids == token] = feats.to(emb.dtype)
    return emb


@torch.no_grad()
def qwen_pruned_forward(tm, input_ids, mm_token_type_ids, layer: int, keep: int, *, pixel_values=None,
                        image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                        second_per_grid_ts=None):
    """Qwen2_5_VLForConditionalGeneration, batch of one, no padding: M-RoPE positions from
    transformers' own get_rope_index, decoder layers one by one, layer K-1's queries (q_proj with
    its bias, before RoPE) scored in float64 over every image and video token together, the top-R
    gathered in original order with all three position rows. Returns (logits [1, S', V], kept
    sequence indices [S'], kept position ids [3, S'])."""
    lm = tm.model.language_model
    h = _qwen_embeddings(tm, input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
    pos, _ = tm.model.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
                                     second_per_grid_ts=second_per_grid_ts)  # [3, 1, S]
    is_visual = mm_token_type_ids[0] > 0
    kept = torch.arange(h.shape[1])
    for i, block in enumerate(lm.layers):
        if i == layer:
            q = block_prev.self_attn.q_proj(block_prev.input_layernorm(h_prev))[0]  # noqa: F821
            visual = torch.nonzero(is_visual).flatten()
            scores = token_entropy_f64(q[visual], lm.config.num_attention_heads)
            top = visual[torch.argsort(-scores, stable=True)[:keep]]
            kept = torch.sort(torch.cat([torch.nonzero(~is_visual).flatten(), top])).values
            h, pos = h[:, kept], pos[:, :, kept]
        n = h.shape[1]
        causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
        h_prev, block_prev = h, block
        h = block(h, attention_mask=causal, position_embeddings=lm.rotary_emb(h, pos))
    return tm.lm_head(lm.norm(h)), kept, pos[:, 0]
