"""Analytic FLOPs / KV bytes against hand computations for LLaVA-1.5-7B (docs/ALGORITHM.md §6)."""

import dataclasses

import pytest

from ep_jax.config import TextConfig
from ep_jax.core.flops import (
    PruneReport,
    flops_reduction,
    kv_cache_bytes,
    layer_flops,
    prefill_flops,
    prune_report,
)

LLAVA_7B = TextConfig(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128)
S, N, K = 640, 576, 2

# Hand computation, per layer, n tokens: 8nD^2 = n * 134_217_728, 6nDM = n * 270_532_608,
# 4n^2 D = n^2 * 16_384.
#   n = 640: 640 * 404_750_336 + 409_600 * 16_384 = 259_040_215_040 + 6_710_886_400
LAYER_640 = 265_751_101_440
UNPRUNED = 32 * LAYER_640  # 8_504_035_246_080


def _hand_layer(n):
    return n * 404_750_336 + n * n * 16_384


def test_layer_flops_hand_computation():
    assert layer_flops(LLAVA_7B, 640) == LAYER_640
    assert layer_flops(LLAVA_7B, 1) == 8 * 4096**2 + 4 * 4096 + 6 * 4096 * 11008
    assert layer_flops(LLAVA_7B, 0) == 0


def test_prefill_unpruned():
    assert prefill_flops(LLAVA_7B, S) == UNPRUNED == 8_504_035_246_080
    assert prefill_flops(LLAVA_7B, S, N) == UNPRUNED  # num_visual alone changes nothing


@pytest.mark.parametrize(
    "keep, expected_flops, expected_reduction",
    [
        (166, 3_350_280_929_280, 0.606036),  # A = 192
        (98, 2_511_488_286_720, 0.704671),  # A = 128: the paper's "about 68-71%"
        (29, 1_665_006_796_800, 0.804210),  # A = 64
    ],
)
def test_pruned_prefill_and_reduction(keep, expected_flops, expected_reduction):
    kept_len = S - N + keep
    assert expected_flops == 2 * LAYER_640 + 30 * _hand_layer(kept_len)
    assert prefill_flops(LLAVA_7B, S, N, layer=K, keep=keep) == expected_flops
    assert flops_reduction(LLAVA_7B, S, N, K, keep) == pytest.approx(expected_reduction, abs=1e-6)


def test_keep_all_is_no_reduction_and_reduction_is_monotone():
    assert prefill_flops(LLAVA_7B, S, N, layer=K, keep=N) == UNPRUNED
    assert flops_reduction(LLAVA_7B, S, N, K, N) == 0.0
    reductions = [flops_reduction(LLAVA_7B, S, N, K, r) for r in (576, 166, 98, 29, 0)]
    assert reductions == sorted(reductions)
    # Pruning later saves less.
    assert flops_reduction(LLAVA_7B, S, N, 3, 98) < flops_reduction(LLAVA_7B, S, N, 2, 98)


def test_kv_cache_bytes():
    per_token_layer = 2 * 32 * 128 * 2  # K and V, 32 kv heads x 128, bf16
    assert kv_cache_bytes(LLAVA_7B, S) == 32 * S * per_token_layer == 335_544_320
    pruned = kv_cache_bytes(LLAVA_7B, S, N, layer=K, keep=98)
    assert pruned == (2 * 640 + 30 * 162) * per_token_layer
    assert kv_cache_bytes(LLAVA_7B, S, bytes_per_elem=4) == 2 * kv_cache_bytes(LLAVA_7B, S)
    gqa = dataclasses.replace(LLAVA_7B, num_kv_heads=8)
    assert kv_cache_bytes(gqa, S) * 4 == kv_cache_bytes(LLAVA_7B, S)


def test_errors():
    with pytest.raises(ValueError, match="give both"):
        prefill_flops(LLAVA_7B, S, N, layer=2)
    with pytest.raises(ValueError, match="keep R=577"):
        prefill_flops(LLAVA_7B, S, N, layer=2, keep=577)
    with pytest.raises(ValueError, match="layer K=32"):
        prefill_flops(LLAVA_7B, S, N, layer=32, keep=10)
    with pytest.raises(ValueError, match="layer K=0"):
        kv_cache_bytes(LLAVA_7B, S, N, layer=0, keep=10)
    with pytest.raises(ValueError, match="num_visual=700"):
        prefill_flops(LLAVA_7B, S, 700)


def test_prune_report():
    report = prune_report(LLAVA_7B, S, N, K, 98, requested_avg_keep=128)
    assert isinstance(report, PruneReport)
    assert report.keep == 98 and report.layer == 2 and report.num_visual == 576
    assert report.avg_keep == pytest.approx((2 * 576 + 30 * 98) / 32)  # 127.875
    assert report.kept_tokens == 162 and report.total_tokens == 640
    assert report.flops_pruned == 2_511_488_286_720
    assert report.flops_reduction == pytest.approx(0.704671, abs=1e-6)
    assert report.kv_bytes_saved == 30 * (640 - 162) * 2 * 32 * 128 * 2
    d = report.to_dict()
    assert d["keep"] == 98 and d["kv_bytes_saved"] == report.kv_bytes_saved
    assert d["requested_avg_keep"] == 128
    line = str(report)
    print(line)
    assert "\n" not in line
    for fragment in ("K=2", "A=127.9", "(asked 128)", "R=98/576", "162/640", "-70.5%"):
        assert fragment in line


def test_window_vision_flops_hand_computation():
    from types import SimpleNamespace

    from ep_jax.core.flops import window_vision_flops

    v = SimpleNamespace(hidden_size=4, intermediate_size=6, depth=2, fullatt_block_indexes=(1,), window_size=112,
                        patch_size=14, spatial_merge_size=2, out_hidden_size=5, patch_dim=3 * 2 * 14 * 14)
    # 64 patches: embed 2*64*1176*4, blocks 2*(8*64*16 + 6*64*4*6), attention 4*64*4*(64 + 64),
    # merger 2*16*16*(16 + 5)
    assert window_vision_flops(v, (1, 8, 8)) == 602112 + 34816 + 131072 + 10752
    # a video: t frame pairs cost t times one (window and full attention both stay within a pair)
    assert window_vision_flops(v, (3, 8, 8)) == 3 * window_vision_flops(v, (1, 8, 8))
