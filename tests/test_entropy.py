"""Matrix entropy (docs/ALGORITHM.md §2, §3) against an independent float64 NumPy reference."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from ep_jax.core.entropy import set_entropy, token_entropy


# Float32 scores against float64, per score: |E32 - E64| / scale, with scale = Σ|λ ln λ| / ln H
# (= |E| unless the terms of E cancel; round-off in λ moves E by about eps·scale, so a score
# that crosses zero through cancellation is not held to a tolerance relative to its own tiny
# value). Measured on this file's inputs (CPU, jit or not): at most 4.1e-6 (h4_d16, one token
# with E = 0.03 and a 12x larger scale; its error relative to |E| is 5e-5), at most 1.0e-6 on
# the 32-head and GQA cases and on the 576-token sets below; 2e-7 with trace normalisation.
F32_TOL = 1e-5


# --------------------------------------------------------------------------- references
def np_token_entropy(states, num_heads, dim_scale=128, trace_normalize=False, return_scale=False):
    """Independent float64 reference: eigenvalues of Z Zᵀ / H from the singular values of Z.

    With `return_scale`, also Σ|λ ln λ| / ln H per token (the magnitude F32_TOL is relative to).
    """
    states = np.asarray(states, np.float64)
    lead, width = states.shape[:-1], states.shape[-1]
    z = states.reshape(-1, num_heads, width // num_heads)
    if z.shape[-1] > dim_scale:
        z = z.reshape(z.shape[0], num_heads, dim_scale, -1).mean(-1)
    z = z - z.mean(axis=1, keepdims=True)
    singular = np.linalg.svd(z, compute_uv=False)  # [T, min(H, d)]
    lam = np.zeros((z.shape[0], num_heads))
    lam[:, : singular.shape[1]] = singular**2 / num_heads
    lam = np.maximum(lam, 1e-10)
    if trace_normalize:
        lam = lam / lam.sum(-1, keepdims=True)
    terms = lam * np.log(lam) / np.log(num_heads)
    entropy = -terms.sum(-1).reshape(lead)
    return (entropy, np.abs(terms).sum(-1).reshape(lead)) if return_scale else entropy


def np_set_entropy(tokens, trace_normalize=True):
    """Reference for one set [n, D]: covariance spectrum via SVD, 0 ln 0 = 0."""
    x = np.asarray(tokens, np.float64)
    x = x - x.mean(0, keepdims=True)
    n, d = x.shape
    lam = np.linalg.svd(x, compute_uv=False) ** 2 / n
    lam = lam[lam > 1e-12 * lam.max()]
    if trace_normalize:
        lam = lam / lam.sum()
    return -(lam * np.log(lam)).sum() / np.log(min(n, d))


def realistic_states(rng, num_tokens, num_heads, head_dim, rank=16, noise=0.3):
    """Low-rank-plus-noise token vectors with a shared mean and varying norms, like queries."""
    width = num_heads * head_dim
    mean = rng.normal(0, 0.5, width)
    basis = rng.normal(0, 1 / math.sqrt(rank), (rank, width))
    latent = rng.normal(0, 1, (num_tokens, rank))
    scale = rng.lognormal(0, 0.3, (num_tokens, 1))
    states = scale * (mean + latent @ basis + noise * rng.normal(0, 1, (num_tokens, width)))
    return states.astype(np.float32)


def rel_err(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def score_err(actual, expected, scale):
    """Largest per-score error relative to each score's own magnitude `scale` (see F32_TOL)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected) / np.asarray(scale)))


def llama_rope(x, positions, theta=10000.0):
    """Rotate-half RoPE: the same rotation on every head of a token. x [..., s, h, d]."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [..., s, d/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[..., None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[..., None, :]
    rotated = jnp.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rotated * sin


CASES = (
    dict(testcase_name="h32_d64", num_heads=32, head_dim=64),
    dict(testcase_name="h32_d128", num_heads=32, head_dim=128),
    dict(testcase_name="h32_d256_dimscale", num_heads=32, head_dim=256),
    dict(testcase_name="gqa_kv8_d128", num_heads=8, head_dim=128),
    dict(testcase_name="h4_d16_rank_deficient", num_heads=4, head_dim=2),
)


# --------------------------------------------------------------------------- token entropy
class TokenEntropyTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*CASES)
    def test_matches_numpy_float32(self, num_heads, head_dim):
        states = realistic_states(np.random.default_rng(head_dim), 48, num_heads, head_dim)
        fn = self.variant(functools.partial(token_entropy, num_heads=num_heads))
        scores = fn(jnp.asarray(states).reshape(2, 24, -1))
        chex.assert_shape(scores, (2, 24))
        assert scores.dtype == jnp.float32
        expected, scale = np_token_entropy(states, num_heads, return_scale=True)
        expected, scale = expected.reshape(2, 24), scale.reshape(2, 24)
        err = score_err(scores, expected, scale)
        assert err <= F32_TOL, err
        # Scores must actually differ between tokens, else agreement is meaningless.
        assert np.std(expected) > 1e-2

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*CASES)
    def test_matches_numpy_float64(self, num_heads, head_dim):
        states = realistic_states(np.random.default_rng(1 + head_dim), 40, num_heads, head_dim)
        expected = np_token_entropy(states, num_heads)
        assert not jax.config.jax_enable_x64
        with jax.enable_x64(True):
            fn = self.variant(functools.partial(token_entropy, num_heads=num_heads, precision="float64"))
            scores = fn(jnp.asarray(states))
            assert scores.dtype == jnp.float64
            err = rel_err(scores, expected)
        assert not jax.config.jax_enable_x64  # restored
        assert err <= 1e-5, err

    @chex.variants(with_jit=True, without_jit=True)
    def test_trace_normalized_option(self):
        states = realistic_states(np.random.default_rng(3), 30, 32, 128)
        fn = self.variant(functools.partial(token_entropy, num_heads=32, trace_normalize=True))
        scores = np.asarray(fn(jnp.asarray(states)))
        np.testing.assert_allclose(scores, np_token_entropy(states, 32, trace_normalize=True), rtol=F32_TOL)
        assert np.all((scores > 0) & (scores <= 1))
        # Normalised: scale-free. Reference default: scale-dependent.
        scaled = np.asarray(fn(jnp.asarray(3 * states)))
        np.testing.assert_allclose(scaled, scores, rtol=F32_TOL)
        raw = token_entropy(jnp.asarray(states), 32)
        raw_scaled = token_entropy(jnp.asarray(3 * states), 32)
        assert np.max(np.abs(raw - raw_scaled)) > 0.1

    def test_default_can_be_negative(self):
        # Large vectors: eigenvalues > 1, so -λ ln λ < 0 (reference: no trace normalisation).
        states = 10 * realistic_states(np.random.default_rng(4), 8, 32, 128)
        scores = np.asarray(token_entropy(jnp.asarray(states), 32))
        assert np.all(scores < 0)
        np.testing.assert_allclose(scores, np_token_entropy(states, 32), rtol=F32_TOL)  # measured 2e-7

    def test_vmap_and_leading_axes(self):
        states = jnp.asarray(realistic_states(np.random.default_rng(5), 24, 8, 64)).reshape(2, 3, 4, 512)
        direct = token_entropy(states, 8)
        mapped = jax.vmap(jax.vmap(functools.partial(token_entropy, num_heads=8)))(states)
        chex.assert_shape(direct, (2, 3, 4))
        chex.assert_trees_all_close(direct, mapped, rtol=1e-6, atol=1e-6)

    def test_rope_invariance(self):
        rng = np.random.default_rng(6)
        num_tokens, num_heads, head_dim = 64, 32, 128
        q = jnp.asarray(realistic_states(rng, num_tokens, num_heads, head_dim)).reshape(num_tokens, num_heads, head_dim)
        positions = jnp.asarray(rng.integers(0, 4096, num_tokens))
        rotated = llama_rope(q, positions)
        assert float(jnp.max(jnp.abs(rotated - q))) > 1.0  # RoPE really moved the vectors
        before = token_entropy(q.reshape(num_tokens, -1), num_heads)
        after = token_entropy(rotated.reshape(num_tokens, -1), num_heads)
        assert rel_err(after, before) <= 1e-5  # measured ~6e-8
        # Control: rotating each head by a *different* angle must change the score.
        per_head = jax.vmap(
            lambda head, offset: llama_rope(head[:, None], positions + offset)[:, 0], in_axes=(1, 0), out_axes=1
        )(q, jnp.asarray(rng.integers(0, 4096, num_heads)))
        broken = token_entropy(per_head.reshape(num_tokens, -1), num_heads)
        assert rel_err(broken, before) > 1e-3  # measured ~4e-3

    def test_errors(self):
        x = jnp.ones((3, 32 * 96))
        with pytest.raises(ValueError, match="head_dim=96 > dim_scale=64"):
            token_entropy(x, 32, dim_scale=64)
        with pytest.raises(ValueError, match="not divisible by num_heads=5"):
            token_entropy(x, 5)
        with pytest.raises(ValueError, match="num_heads=1"):
            token_entropy(x, 1)
        with pytest.raises(ValueError, match="precision"):
            token_entropy(x, 32, precision="bfloat16")

    def test_float64_without_x64_is_a_clear_error(self):
        assert not jax.config.jax_enable_x64
        with pytest.raises(ValueError, match=r'jax_enable_x64", True\).*JAX_ENABLE_X64=1'):
            token_entropy(jnp.ones((3, 256)), 2, precision="float64")


def test_float32_vs_float64_top_r_agreement():
    """Float32 scores must keep the same top-R tokens as float64 except near-ties (ALGORITHM §2).

    Cases: entry scale ~1 gives E in the hundreds (negative, as for 7B-sized queries); scale 0.1
    puts eigenvalues around 1, where E crosses zero; "background" makes 300 of the 576 tokens
    copies of 4 patches up to 1e-6 noise (flat image regions) — exact-tie territory, where the
    two precisions may order the copies differently but only within the float32 error.
    """
    num_tokens, num_heads, head_dim = 576, 32, 128
    report = []
    for name, noise, scale, duplicates in (
        ("lowrank", 0.3, 1.0, False),
        ("small-scale", 1.0, 0.1, False),
        ("low-noise", 0.05, 0.3, False),
        ("background", 0.3, 1.0, True),
    ):
        rng = np.random.default_rng(7)
        states = scale * realistic_states(rng, num_tokens, num_heads, head_dim, noise=noise)
        if duplicates:
            copies = states[rng.integers(0, 4, 300)]
            states[-300:] = copies + 1e-6 * rng.normal(size=copies.shape).astype(np.float32)
        e32 = np.asarray(token_entropy(jnp.asarray(states), num_heads), np.float64)
        with jax.enable_x64(True):
            e64 = np.asarray(token_entropy(jnp.asarray(states), num_heads, precision="float64"))
        max_abs = float(np.max(np.abs(e32 - e64)))
        _, scale = np_token_entropy(states, num_heads, return_scale=True)
        assert score_err(e32, e64, scale) <= F32_TOL, name
        for keep in (166, 98, 29):
            top32 = set(np.argsort(-e32, kind="stable")[:keep].tolist())
            top64 = set(np.argsort(-e64, kind="stable")[:keep].tolist())
            overlap = len(top32 & top64) / keep
            # Every disagreement must be a near-tie at the float64 boundary.
            threshold = np.sort(e64)[::-1][keep - 1 : keep + 1].mean()
            differing = sorted(top32 ^ top64)
            gap = float(np.max(np.abs(e64[differing] - threshold))) if differing else 0.0
            assert gap <= 2 * max_abs, (name, keep, gap, max_abs)
            if not duplicates:
                assert overlap >= 0.97, (name, keep, overlap)
            report.append((name, keep, overlap, len(differing) // 2, gap, max_abs, np.ptp(e64)))
    print("\nfloat32 vs float64 top-R agreement (576 tokens, 32 heads x 128):")
    for name, keep, overlap, swaps, gap, max_abs, spread in report:
        print(
            f"  {name:<11} R={keep:<3} overlap={overlap:.4f} swapped={swaps:<2} "
            f"max|E32-E64|={max_abs:.2e} worst swap gap to threshold={gap:.1e} (score range {spread:.3g})"
        )


# --------------------------------------------------------------------------- set entropy / dual Gram
def _low_rank_set(rng, batch, n, d, rank=8, noise=0.1):
    x = rng.normal(size=(batch, n, rank)) @ rng.normal(size=(rank, d)) + noise * rng.normal(size=(batch, n, d))
    return jnp.asarray(x, jnp.float32)


class SetEntropyTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        dict(testcase_name="tokens_lt_features", n=48, d=96),
        dict(testcase_name="tokens_gt_features", n=96, d=48),
    )
    def test_both_sides_equal_and_match_numpy(self, n, d):
        x = _low_rank_set(np.random.default_rng(n + d), 3, n, d)
        tokens_side = self.variant(functools.partial(set_entropy, side="tokens"))(x)
        features_side = self.variant(functools.partial(set_entropy, side="features"))(x)
        chex.assert_shape(tokens_side, (3,))
        chex.assert_trees_all_close(tokens_side, features_side, rtol=1e-4, atol=1e-5)
        expected = [np_set_entropy(x[i]) for i in range(3)]
        np.testing.assert_allclose(np.asarray(tokens_side), expected, rtol=1e-4)
        assert np.all((np.asarray(tokens_side) > 0) & (np.asarray(tokens_side) < 1))

    def test_auto_uses_the_smaller_gram(self):
        for n, d in ((48, 96), (96, 48)):
            jaxpr = str(jax.make_jaxpr(set_entropy)(jnp.zeros((3, n, d))))
            assert "eigh" in jaxpr and "f32[3,48,48]" in jaxpr and "f32[3,96,96]" not in jaxpr

    def test_raw_spectrum_both_sides(self):
        x = _low_rank_set(np.random.default_rng(11), 3, 48, 96)
        raw_tokens = set_entropy(x, trace_normalize=False, side="tokens")
        raw_features = set_entropy(x, trace_normalize=False, side="features")
        chex.assert_trees_all_close(raw_tokens, raw_features, rtol=1e-4, atol=1e-5)
        assert np.max(np.abs(raw_tokens - set_entropy(x, side="tokens"))) > 0.1

    @chex.variants(with_jit=True, without_jit=True)
    def test_mask_equals_valid_subset(self):
        rng = np.random.default_rng(9)
        n, d, valid = 40, 64, (40, 25, 7)
        x = rng.normal(size=(3, n, 6)) @ rng.normal(size=(6, d)) + 0.2 * rng.normal(size=(3, n, d))
        mask = np.arange(n)[None, :] < np.asarray(valid)[:, None]
        x = np.where(mask[..., None], x, 1e3 * rng.normal(size=x.shape))  # garbage in padding
        x = np.asarray(x, np.float32)
        fn = self.variant(functools.partial(set_entropy, mask=jnp.asarray(mask)))
        masked = np.asarray(fn(jnp.asarray(x)))
        expected = [np_set_entropy(x[i, : valid[i]]) for i in range(3)]
        np.testing.assert_allclose(masked, expected, rtol=2e-4)
        unmasked = np.asarray(set_entropy(jnp.asarray(x[1:2, :25])))
        np.testing.assert_allclose(masked[1], unmasked[0], rtol=2e-4)

    def test_lower_entropy_for_collapsed_set(self):
        rng = np.random.default_rng(10)
        diverse = rng.normal(size=(64, 128))
        collapsed = rng.normal(size=(64, 2)) @ rng.normal(size=(2, 128)) + 1e-2 * rng.normal(size=(64, 128))
        e = np.asarray(set_entropy(jnp.asarray(np.stack([diverse, collapsed]), jnp.float32)))
        assert e[0] > 0.8 and e[1] < 0.4, e

    def test_single_valid_token_is_nan(self):
        x = jnp.ones((1, 5, 8))
        out = set_entropy(x, mask=jnp.asarray([[True, False, False, False, False]]))
        assert np.isnan(np.asarray(out)).all()
