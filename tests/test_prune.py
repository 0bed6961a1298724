"""Pruning policy (docs/ALGORITHM.md §4, §5, §7): budget, scorers and static-shape selection."""

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from ep_jax.core.budget import PruneConfig, budget, effective_avg, keep_per_example, ratio_budget, resolve_keep
from ep_jax.core.scorers import SCORERS, ScoreInputs, pool_scores, pool_spans_scores, score
from ep_jax.core.select import gather_rows, select_kept
from ep_jax.core.spans import ImageSlots, build_spans
from test_entropy import llama_rope, np_token_entropy, realistic_states


# --------------------------------------------------------------------------- config & budget
def test_config_is_hashable_and_static():
    cfg = PruneConfig(avg_keep=128)
    assert cfg == PruneConfig(avg_keep=128) and hash(cfg) == hash(PruneConfig(avg_keep=128))
    assert cfg.method == "entropy" and cfg.layer == 2 and cfg.source == "query" and not cfg.trace_normalize
    assert cfg.precision == "float32" and cfg.dim_scale == 128 and cfg.mode == "gather"
    f = jax.jit(lambda x, c: x * c.avg_keep, static_argnums=1)
    assert float(f(jnp.float32(2), cfg)) == 256.0
    assert PruneConfig(method="none").enabled is False
    assert PruneConfig(layer="auto", keep=10).layer == "auto"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="fast", keep=1), "method='fast'"),
        (dict(source="attn", keep=1), "source='attn'"),
        (dict(mode="scatter", keep=1), "mode='scatter'"),
        (dict(precision="bfloat16", keep=1), "precision='bfloat16'"),
        (dict(layer=0, keep=1), "layer=0"),
        (dict(layer="late", keep=1), "layer='late'"),
        (dict(layer=True, keep=1), "layer=True"),
        (dict(), "give exactly one"),
        (dict(avg_keep=128, keep=98), "give exactly one"),
        (dict(keep=-1), "keep=-1"),
        (dict(avg_keep=12.5), "avg_keep=12.5"),
        (dict(method="none", avg_keep=1, keep=1), "at most one"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PruneConfig(**kwargs)


@pytest.mark.parametrize("avg_keep, expected", [(192, 166), (128, 98), (64, 29)])
def test_budget_table(avg_keep, expected):
    keep = budget(avg_keep, num_layers=32, layer=2, num_visual=576)
    assert keep == expected
    assert keep == (32 * avg_keep - 2 * 576) // 30
    achieved = effective_avg(keep, 32, 2, 576)
    assert achieved <= avg_keep < achieved + 30 / 32  # floor loses less than one R step
    assert resolve_keep(PruneConfig(avg_keep=avg_keep), 32, 576) == expected


def test_budget_edges_and_errors():
    assert budget(576, 32, 2, 576) == 576
    assert budget(36, 32, 2, 576) == 0  # L·A == K·N exactly
    assert effective_avg(166, 32, 2, 576) == pytest.approx(191.625)
    with pytest.raises(ValueError, match=r"A=577 is outside \[0, N=576\]"):
        budget(577, 32, 2, 576)
    with pytest.raises(ValueError, match="A=35 cannot be met.*avg_keep >= 36"):
        budget(35, 32, 2, 576)
    with pytest.raises(ValueError, match="K=32 >= num_layers L=32"):
        budget(128, 32, 32, 576)
    with pytest.raises(ValueError, match="K=0"):
        budget(128, 32, 0, 576)


def test_resolve_keep():
    assert resolve_keep(PruneConfig(keep=100), 32, 576) == 100
    assert resolve_keep(PruneConfig(keep=0, layer=5), 32, 576) == 0
    assert resolve_keep(PruneConfig(method="none"), 32, 576) == 576
    assert resolve_keep(PruneConfig(avg_keep=128, layer=1), 32, 576) == (32 * 128 - 576) // 31
    with pytest.raises(ValueError, match=r"keep R=600 is outside \[0, N=576\]"):
        resolve_keep(PruneConfig(keep=600), 32, 576)
    with pytest.raises(ValueError, match="K=40 >= num_layers L=32"):
        resolve_keep(PruneConfig(keep=10, layer=40), 32, 576)
    with pytest.raises(ValueError, match='layer="auto" must be resolved'):
        resolve_keep(PruneConfig(keep=10, layer="auto"), 32, 576)
    with pytest.raises(ValueError, match="A=20 cannot be met"):
        resolve_keep(PruneConfig(avg_keep=20), 32, 576)


# --------------------------------------------------------------------------- selection
def np_select_kept(scores, visual_positions, visual_valid, seq_len, keep):
    """Reference: rank valid finite > valid NaN > invalid; ties to the earlier position."""
    kept = []
    for sc, pos, valid in zip(scores, visual_positions, visual_valid):
        tier = np.where(~valid, 0, np.where(np.isnan(sc), 1, 2))
        value = np.where(tier == 2, sc, 0.0)
        order = sorted(range(len(pos)), key=lambda j: (-tier[j], -value[j], pos[j]))
        chosen = set(pos[order[:keep]].tolist())
        text = set(range(seq_len)) - set(pos.tolist())
        kept.append(sorted(text | chosen))
    return np.asarray(kept)


def _select(scores, visual_positions, visual_valid, seq_len, keep):
    """`select_kept` with one R for the batch and the padded slots pointing at padding tokens:
    the rows are `seq_len - n + keep` (every padding row kept)."""
    vp, vv = np.asarray(visual_positions), np.asarray(visual_valid)
    token_valid = np.ones((vp.shape[0], seq_len), bool)
    for i in range(vp.shape[0]):
        token_valid[i, np.setdiff1d(vp[i][~vv[i]], vp[i][vv[i]])] = False
    keep_b = jnp.full((vp.shape[0],), keep, jnp.int32)
    kept, _ = select_kept(jnp.asarray(scores), jnp.asarray(vp), jnp.asarray(vv), jnp.asarray(token_valid), keep_b,
                          seq_len - vp.shape[1] + keep)
    return kept


def _selection_case(seed=0):
    rng = np.random.default_rng(seed)
    b, seq_len, n = 3, 24, 8
    visual_positions = np.stack([np.arange(3, 11), np.arange(5, 13), np.arange(16, 24)])
    visual_valid = np.ones((b, n), bool)
    visual_valid[1, 5:] = False  # example 1 has a smaller image: 3 padded slots
    scores = rng.normal(size=(b, n)).astype(np.float32)
    scores[0, 2] = np.nan
    scores[0, 5] = -np.inf
    scores[1, 1] = np.inf
    scores[1, 6] = 100.0  # invalid slot with a huge score must still rank last
    scores[2, :4] = 0.5  # exact ties: the earlier position wins
    return scores, visual_positions, visual_valid, seq_len


class SelectKeptTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(0, 1, 3, 5, 8)
    def test_matches_numpy_reference(self, keep):
        scores, visual_positions, visual_valid, seq_len = _selection_case()
        fn = self.variant(functools.partial(_select, visual_positions=visual_positions, visual_valid=visual_valid,
                                            seq_len=seq_len, keep=keep))
        kept = np.asarray(fn(jnp.asarray(scores)))
        chex.assert_shape(kept, (3, seq_len - 8 + keep))
        np.testing.assert_array_equal(kept, np_select_kept(scores, visual_positions, visual_valid, seq_len, keep))
        # Properties: ascending, unique, every non-visual position kept.
        assert np.all(np.diff(kept, axis=1) > 0)
        for i in range(3):
            text = set(range(seq_len)) - set(visual_positions[i].tolist())
            assert text <= set(kept[i].tolist())

    def test_padded_and_nan_rank_last(self):
        scores, visual_positions, visual_valid, seq_len = _selection_case()
        kept = np.asarray(_select(jnp.asarray(scores), jnp.asarray(visual_positions), jnp.asarray(visual_valid), seq_len, 5))
        # Example 1 has exactly 5 valid slots: all kept, none of the padded ones (despite 100.0).
        assert set(kept[1].tolist()) & set(visual_positions[1].tolist()) == set(range(5, 10))
        # Example 0 keeping 7 of 8: the NaN slot (position 5) is the one dropped, not -inf.
        kept7 = np.asarray(_select(jnp.asarray(scores), jnp.asarray(visual_positions), jnp.asarray(visual_valid), seq_len, 7))
        assert 5 not in kept7[0] and 8 in kept7[0]
        # Exact ties go to the earlier position (lax.top_k is stable).
        tied = _select(jnp.zeros((3, 8)), jnp.asarray(visual_positions), jnp.ones((3, 8), bool), seq_len, 2)
        for i in range(3):
            assert set(np.asarray(tied[i]).tolist()) & set(visual_positions[i].tolist()) == set(visual_positions[i, :2].tolist())

    def test_padded_slot_repeating_a_position_does_not_hide_it(self):
        kept = _select(
            jnp.asarray([[0.0, 0.0, 10.0, 100.0]]), jnp.asarray([[3, 4, 5, 5]]),
            jnp.asarray([[True, True, True, False]]), 8, 3,
        )
        assert 5 in np.asarray(kept[0])

    def test_float64_scores_keep_their_precision(self):
        scores = np.array([[1.0, 1.0 + 1e-12, 1.0 - 1e-12, 0.0]])
        with jax.enable_x64(True):
            kept = _select(jnp.asarray(scores), jnp.arange(1, 5)[None], jnp.ones((1, 4), bool), 6, 1)
        np.testing.assert_array_equal(np.asarray(kept), [[0, 2, 5]])  # 1 + 1e-12 at position 2

    def test_no_recompile_for_new_scores_or_budgets(self):
        scores, visual_positions, visual_valid, seq_len = _selection_case()
        fn = jax.jit(select_kept, static_argnums=(5,))
        valid = jnp.ones((3, seq_len), bool)
        for seed in range(3):
            fn(jnp.asarray(np.random.default_rng(seed).normal(size=scores.shape), jnp.float32),
               jnp.asarray(visual_positions), jnp.asarray(visual_valid), valid, jnp.asarray([seed, 4, 2]), seq_len - 4)
        assert fn._cache_size() == 1

    def test_errors(self):
        scores, visual_positions, visual_valid, seq_len = _selection_case()
        valid, keep = jnp.ones((3, seq_len), bool), jnp.full((3,), 2)
        with pytest.raises(ValueError, match=r"kept_len=25 outside \[0, seq_len=24\]"):
            select_kept(jnp.asarray(scores), jnp.asarray(visual_positions), jnp.asarray(visual_valid), valid, keep, 25)
        with pytest.raises(ValueError, match="must all be"):
            select_kept(jnp.asarray(scores), jnp.asarray(visual_positions[:, :4]), jnp.asarray(visual_valid), valid,
                        keep, 20)

    def test_each_example_keeps_its_own_r(self):
        """Per-example budgets under one static shape: example i keeps its top keep[i] visual
        tokens and all its text; the surplus rows are masked."""
        scores, visual_positions, visual_valid, seq_len = _selection_case(2)
        keep = np.array([2, 5, 0])
        token_valid = np.ones((3, seq_len), bool)
        token_valid[1, visual_positions[1, 5:]] = False  # example 1's padded slots sit on padding
        kept, kept_valid = select_kept(jnp.asarray(scores), jnp.asarray(visual_positions), jnp.asarray(visual_valid),
                                       jnp.asarray(token_valid), jnp.asarray(keep), seq_len - 8 + 5)
        kept, kept_valid = np.asarray(kept), np.asarray(kept_valid)
        for i in range(3):
            real = set(kept[i][kept_valid[i]].tolist())
            reference = set(np_select_kept(scores[i:i + 1], visual_positions[i:i + 1], visual_valid[i:i + 1],
                                           seq_len, int(keep[i]))[0].tolist())
            assert real == reference - set(np.flatnonzero(~token_valid[i]).tolist()), i


def test_gather_rows():
    rng = np.random.default_rng(1)
    kept = jnp.asarray([[0, 2, 3], [1, 2, 4]])
    for shape in ((2, 5), (2, 5, 6), (2, 5, 3, 4)):
        x = rng.normal(size=shape).astype(np.float32)
        out = gather_rows(jnp.asarray(x), kept)
        chex.assert_shape(out, (2, 3) + shape[2:])
        np.testing.assert_array_equal(np.asarray(out), np.stack([x[0, [0, 2, 3]], x[1, [1, 2, 4]]]))


# --------------------------------------------------------------------------- scorers
B, S, HEADS, KV_HEADS, HEAD_DIM, N_VIS = 2, 20, 8, 4, 32, 10


def _rope(x, positions):
    return llama_rope(x, positions)


def _score_inputs(seed=0):
    """Example 0 left-padded (3 pads), example 1 right-padded (2 pads); images at different offsets."""
    rng = np.random.default_rng(seed)
    attention_mask = np.ones((B, S), bool)
    attention_mask[0, :3] = False
    attention_mask[1, -2:] = False
    positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)
    visual_positions = np.stack([np.arange(5, 5 + N_VIS), np.arange(2, 2 + N_VIS)])
    visual_valid = np.ones((B, N_VIS), bool)
    visual_valid[1, -2:] = False
    query = realistic_states(rng, B * S, HEADS, HEAD_DIM).reshape(B, S, HEADS, HEAD_DIM)
    key = realistic_states(rng, B * S, KV_HEADS, HEAD_DIM).reshape(B, S, KV_HEADS, HEAD_DIM)
    value = realistic_states(rng, B * S, KV_HEADS, HEAD_DIM).reshape(B, S, KV_HEADS, HEAD_DIM)
    hidden = realistic_states(rng, B * S, HEADS, HEAD_DIM).reshape(B, S, HEADS * HEAD_DIM)
    arrays = dict(
        query=query, key=key, value=value, hidden=hidden, positions=positions,
        attention_mask=attention_mask, visual_positions=visual_positions, visual_valid=visual_valid,
    )
    inputs = ScoreInputs(**{k: jnp.asarray(v) for k, v in arrays.items()}, rope=_rope)
    return inputs, arrays


@pytest.mark.parametrize(
    "source, num_rows",
    [("query", HEADS), ("key", KV_HEADS), ("value", KV_HEADS), ("hidden", HEADS)],
)
def test_entropy_scorer_sources(source, num_rows):
    inputs, arrays = _score_inputs()
    cfg = PruneConfig(keep=4, source=source)
    scores = score(inputs, cfg, 4)
    chex.assert_shape(scores, (B, N_VIS))
    rows = np.take_along_axis(
        arrays[source].reshape(B, S, -1), arrays["visual_positions"][..., None], axis=1
    )
    expected = np_token_entropy(rows, num_rows)
    np.testing.assert_allclose(np.asarray(scores), expected, rtol=1e-4)


def test_entropy_scorer_rope_invariant_and_jittable():
    inputs, _ = _score_inputs(1)
    cfg = PruneConfig(keep=4)

    @functools.partial(jax.jit, static_argnums=1)
    def run(query, cfg):
        return score(dataclasses.replace(inputs, query=query), cfg, 4)

    plain = run(inputs.query, cfg)
    roped = run(_rope(inputs.query, inputs.positions), cfg)
    chex.assert_trees_all_close(plain, roped, rtol=1e-5, atol=1e-5)


def np_rope(x, positions, theta=10000.0):
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2) / d)
    angles = positions[..., None] * inv_freq
    cos = np.concatenate([np.cos(angles)] * 2, -1)[..., None, :]
    sin = np.concatenate([np.sin(angles)] * 2, -1)[..., None, :]
    return x * cos + np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1) * sin


def np_fastv(arrays):
    """Naive: the full [b, H, S, S] causal attention map in float64, then one row of it."""
    q = np_rope(arrays["query"].astype(np.float64), arrays["positions"])
    k = np_rope(arrays["key"].astype(np.float64), arrays["positions"])
    k = np.repeat(k, HEADS // KV_HEADS, axis=2)  # GQA: query head h uses kv head h // G
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(HEAD_DIM)
    allowed = np.tril(np.ones((S, S), bool))[None] & arrays["attention_mask"][:, None, :]
    logits = np.where(allowed[:, None], logits, -np.inf)
    with np.errstate(invalid="ignore"):
        attn = np.exp(logits - logits.max(-1, keepdims=True))
        attn = attn / attn.sum(-1, keepdims=True)
    out = []
    for i in range(B):
        last = np.flatnonzero(arrays["attention_mask"][i])[-1]
        received = attn[i, :, last, :].mean(0)
        out.append(received[arrays["visual_positions"][i]])
    return np.stack(out)


def test_fastv_equals_naive_attention_map():
    inputs, arrays = _score_inputs(2)
    cfg = PruneConfig(method="fastv", keep=4)
    scores = jax.jit(lambda inputs_query: score(dataclasses.replace(inputs, query=inputs_query), cfg, 4))(inputs.query)
    expected = np_fastv(arrays)
    chex.assert_shape(scores, (B, N_VIS))
    np.testing.assert_allclose(np.asarray(scores), expected, rtol=1e-4, atol=1e-7)
    # Sanity: the attention weights are a real distribution that differs between tokens.
    assert np.all(expected > 0) and np.all(expected.sum(-1) < 1) and np.std(expected) > 1e-3


def test_random_scorer():
    inputs, _ = _score_inputs()
    a = score(inputs, PruneConfig(method="random", keep=3, seed=1), 3)
    b = score(inputs, PruneConfig(method="random", keep=3, seed=1), 3)
    c = score(inputs, PruneConfig(method="random", keep=3, seed=2), 3)
    chex.assert_shape(a, (B, N_VIS))
    chex.assert_trees_all_equal(a, b)
    assert not np.allclose(np.asarray(a), np.asarray(c))
    assert np.all((np.asarray(a) >= 0) & (np.asarray(a) < 1))
    assert not np.allclose(np.asarray(a)[0], np.asarray(a)[1])  # examples get different draws


def test_pool_exact_stride_lattice():
    grid = pool_scores(576, 144).reshape(24, 24)
    expected = np.zeros((24, 24), np.float32)
    expected[1::2, 1::2] = 1.0  # every other row and column, centred
    np.testing.assert_array_equal(grid, expected)
    np.testing.assert_array_equal(np.flatnonzero(pool_scores(50, 10)), np.arange(2, 50, 5))


@pytest.mark.parametrize("keep", [166, 98, 29, 1, 576])
def test_pool_spreads_evenly(keep):
    grid = pool_scores(576, keep).reshape(24, 24)
    assert grid.sum() == keep and set(np.unique(grid)) <= {0.0, 1.0}
    rows = np.flatnonzero(grid.sum(1))
    cols = np.flatnonzero(grid.sum(0))
    per_row = grid.sum(1)[rows]
    assert per_row.max() - per_row.min() <= 1  # balanced rows
    for lines in (rows, cols):  # evenly spaced rows and columns
        gaps = np.diff(lines)
        assert len(gaps) == 0 or gaps.max() - gaps.min() <= 1
    # Coverage: every grid cell is near a kept cell.
    kept = np.argwhere(grid > 0)
    cells = np.argwhere(np.ones((24, 24)))
    distance = np.abs(cells[:, None, :] - kept[None, :, :]).max(-1).min(1)
    assert distance.max() <= math.ceil(24 / math.sqrt(keep)), distance.max()


def test_pool_scorer_and_dispatch():
    inputs, _ = _score_inputs()
    host = np.broadcast_to(pool_scores(N_VIS, 3), (B, N_VIS))
    scores = score(dataclasses.replace(inputs, pool=jnp.asarray(host)), PruneConfig(method="pool", keep=3), 3)
    chex.assert_shape(scores, (B, N_VIS))
    np.testing.assert_array_equal(np.asarray(scores[0]), pool_scores(N_VIS, 3))
    with pytest.raises(ValueError, match=r"needs ScoreInputs fields \['pool'\]"):
        score(inputs, PruneConfig(method="pool", keep=3), 3)
    assert set(SCORERS) == {"entropy", "fastv", "random", "pool"}
    with pytest.raises(ValueError, match="no scorer"):
        score(inputs, PruneConfig(method="none"), 3)
    with pytest.raises(ValueError, match=r"needs ScoreInputs fields \['rope'\]"):
        score(dataclasses.replace(inputs, rope=None), PruneConfig(method="fastv", keep=3), 3)


def test_end_to_end_selection_keeps_original_positions():
    inputs, arrays = _score_inputs(3)
    keep = 4

    @jax.jit
    def prune(inputs_query):
        local = dataclasses.replace(inputs, query=inputs_query)
        scores = score(local, PruneConfig(keep=keep), keep)
        kept = _select(scores, local.visual_positions, local.visual_valid, S, keep)
        return scores, kept, gather_rows(local.positions, kept), gather_rows(local.hidden, kept)

    scores, kept, kept_positions, kept_hidden = prune(inputs.query)
    chex.assert_shape(kept, (B, S - N_VIS + keep))
    chex.assert_shape(kept_hidden, (B, S - N_VIS + keep, HEADS * HEAD_DIM))
    np.testing.assert_array_equal(np.asarray(kept_positions), np.take_along_axis(arrays["positions"], np.asarray(kept), 1))
    for i in range(B):
        valid_scores = np.where(arrays["visual_valid"][i], np.asarray(scores[i]), -np.inf)
        top = set(arrays["visual_positions"][i][np.argsort(-valid_scores)[:keep]].tolist())
        assert set(np.asarray(kept[i]).tolist()) & set(arrays["visual_positions"][i].tolist()) == top


def test_pool_over_spans_matches_the_square_lattice_and_splits_r_over_images():
    """`pool` reads the visual spans: one square image gives the lattice of `pool_scores`; two
    images of one example share R in proportion to their tokens, each an even lattice; a CLS
    token (off the grid) is not chosen while the grid can hold R."""
    one = ImageSlots.square(24)
    spans = build_spans([np.ones(576, bool)], [[one]], 576)
    np.testing.assert_array_equal(pool_spans_scores(spans, np.array([144]))[0], pool_scores(576, 144))
    with_cls = ImageSlots.square(4, leading=1)
    spans = build_spans([np.ones(34, bool), np.r_[np.ones(17, bool), np.zeros(17, bool)]],
                        [[with_cls, with_cls], [with_cls]], 34)
    scores = pool_spans_scores(spans, np.array([6, 4]))
    assert scores[0].sum() == 6 and scores[0, :17].sum() == 3 and scores[0, 17:].sum() == 3
    assert scores[0, 0] == 0 and scores[0, 17] == 0  # the CLS tokens
    np.testing.assert_array_equal(scores[1, 1:17], pool_scores(16, 4))
    assert scores[1, 17:].sum() == 0  # padded slots


def test_per_example_budgets_and_keep_ratio():
    """`keep_per_example`: each example's R from its own N (A and keep_ratio), 0 without images;
    keep_ratio 0.25 / 0.125 at L = 28, K = 1 are the reduction ratios 0.7778 / 0.9074."""
    cfg = PruneConfig(layer=2, avg_keep=128)
    np.testing.assert_array_equal(keep_per_example(cfg, 32, np.array([576, 0, 1152])),
                                  [budget(128, 32, 2, 576), 0, budget(128, 32, 2, 1152)])
    for ratio, reduction in ((0.25, 0.7778), (0.125, 0.9074)):
        r = ratio_budget(ratio, 28, 1, 100_000)
        assert abs(1 - r / 100_000 - reduction) < 1e-4, (ratio, r)
        assert resolve_keep(PruneConfig(layer=1, keep_ratio=ratio), 28, 100_000) == r
    with pytest.raises(ValueError, match="example 1"):
        keep_per_example(PruneConfig(layer=2, avg_keep=64), 32, np.array([576, 40]))
    with pytest.raises(ValueError, match="exactly one"):
        PruneConfig(layer=2, avg_keep=64, keep_ratio=0.25)
    with pytest.raises(ValueError, match="keep_ratio"):
        PruneConfig(layer=2, keep_ratio=1.5)
