"""`python -m ep_jax.bench`: the commands run end to end on the tiny config and write complete,
consistent outputs; the analytic side matches hand computations. No timing assertions."""

import json
import sys
import types

import numpy as np
import pytest
from PIL import Image

from ep_jax import bench, bench_compile, bench_setup, bench_speed
from ep_jax.core.flops import kv_cache_bytes, prefill_flops
from ep_jax.core.budget import budget

ROW_FIELDS = {
    "method", "budget", "avg_keep", "effective_avg_keep", "keep", "layer", "tokens_after_prune", "compile_s",
    "prefill_ms", "prefill_ms_runs", "ttft_ms", "ttft_ms_runs", "kv_cache_bytes", "kv_cache_allocated_bytes",
    "xla_memory", "xla_flops", "prompt_tokens", "flops", "flops_reduction", "flops_speedup",
    "kv_cache_bytes_analytic", "peak_memory_bytes", "peak_memory_source", "prefill_speedup", "time_reduction",
    "realised", "vision_flops", "flops_reduction_with_vision", "realised_with_vision",
}
DECODE_FIELDS = {"decode_compile_s", "new_tokens", "decode_ms_per_step", "decode_tokens_per_s", "decode_s_runs"}
TOP_FIELDS = {
    "schema", "command", "timestamp", "config", "dtype", "layout", "machine", "model", "init_s", "methods_note", "prompt",
    "layer", "runs", "warmup", "max_new_tokens", "decode_measured_for", "decode_room", "vision_ms", "vision_ms_runs",
    "vision_compile_s", "rows", "scoring", "profile", "explain", "vs_hf", "mfu", "other_cpu_load", "quiet_cpu",
    "targets", "total_s",
}
MACHINE_FIELDS = {"platform", "cpu", "cpu_count", "jax", "jaxlib", "backend", "device_kind", "device_count"}
HF_FIELDS = {
    "transformers", "torch", "torch_threads", "xla_threads", "dtype", "hf_prefill_ms", "hf_decode_ms_per_step",
    "hf_decode_tokens_per_s", "ep_jax_prefill_ms", "ep_jax_decode_ms_per_step", "prefill_ratio", "decode_ratio",
    "last_logits_max_abs_diff",
}
PARTS = {"vision_tower", "embed_merge", "layers_before_K", "prune_stage", "layers_from_K", "kv_cache_build",
         "norm_lm_head"}


@pytest.fixture(scope="module")
def speed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["speed", "--config", "tiny", "--budgets", "none,64", "--methods", "entropy,pool", "--runs", "2",
            "--warmup", "1", "--max-new-tokens", "6", "--vs-hf", "--out", str(out), "--name", "tiny"]
    assert bench.main(argv) == 0
    return out, json.loads((out / "tiny.json").read_text())


def test_speed_json_has_every_field(speed_run):
    _, res = speed_run
    assert TOP_FIELDS <= set(res)
    assert MACHINE_FIELDS <= set(res["machine"])
    assert res["config"] == "tiny" and res["dtype"] == "float32" and res["runs"] == 2
    assert [(r["method"], r["budget"]) for r in res["rows"]] == [("none", "none"), ("entropy", "64"), ("pool", "64")]
    for r in res["rows"]:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert len(r["prefill_ms_runs"]) == 2 and r["prefill_ms"] > 0 and r["ttft_ms"] >= r["prefill_ms"]
    # Decode is timed for the unpruned model and the smallest R ("ends"), for the first method only.
    timed = [(r["method"], r["budget"]) for r in res["rows"] if DECODE_FIELDS <= set(r)]
    assert timed == [("none", "none"), ("entropy", "64")]
    assert all(r["new_tokens"] == 6 for r in res["rows"] if "new_tokens" in r)
    assert HF_FIELDS <= set(res["vs_hf"])
    assert {s["method"] for s in res["scoring"]} == {"entropy", "pool"} and len(res["scoring"]) == 2
    assert set(res["profile"]) == {"none", "entropy@64"}
    for p in res["profile"].values():
        assert set(p["parts_ms"]) == PARTS
    assert [t["target"] for t in res["targets"]][0].startswith("prefill time reduction at A=64")
    assert len(res["targets"]) == 6 and all({"value", "threshold", "met", "applies_here"} <= set(t)
                                            for t in res["targets"])


def test_speed_numbers_are_consistent(speed_run):
    _, res = speed_run
    cfg = bench_setup.get_config("tiny")
    n, num_layers, seq = cfg.image_seq_len, cfg.text.num_layers, res["prompt"]["tokens"]
    assert res["prompt"]["visual_tokens"] == n == 36
    assert 50 <= res["prompt"]["text_tokens"] <= 70  # a realistic chat prompt
    base = res["rows"][0]
    for r in res["rows"]:
        if r["method"] != "none":
            a = round(int(r["budget"]) * n / 576)
            assert r["avg_keep"] == a and r["keep"] == budget(a, num_layers, 2, n)
            assert r["tokens_after_prune"] == seq - n + r["keep"]
            assert r["flops"] == prefill_flops(cfg.text, seq, n, 2, r["keep"])
            assert r["prefill_speedup"] == pytest.approx(base["prefill_ms"] / r["prefill_ms"])
        # The measured prompt KV cache is exactly the analytic formula (float32: 4 bytes).
        assert r["kv_cache_bytes"] == r["kv_cache_bytes_analytic"]
        assert r["kv_cache_bytes_analytic"] == kv_cache_bytes(
            cfg.text, seq, n, r["layer"], None if r["layer"] is None else r["keep"], bytes_per_elem=4)
        assert r["realised"] is None or r["realised"] == pytest.approx(r["time_reduction"] / r["flops_reduction"])
        assert r["flops_reduction_with_vision"] < r["flops_reduction"] or r["flops_reduction"] == 0
    assert base["flops"] == prefill_flops(cfg.text, seq)
    # Same weights in PyTorch: the comparison is of the same computation.
    assert res["vs_hf"]["last_logits_max_abs_diff"] < 1e-4
    hf = res["vs_hf"]
    assert hf["prefill_ratio"] == pytest.approx(hf["ep_jax_prefill_ms"] / hf["hf_prefill_ms"])
    assert hf["decode_ratio"] == pytest.approx(hf["ep_jax_decode_ms_per_step"] / hf["hf_decode_ms_per_step"])
    assert len(hf["ep_jax_prefill_ms_runs"]) == 2


def test_speed_markdown_and_png(speed_run):
    out, res = speed_run
    md = (out / "tiny.md").read_text()
    for heading in ("## Unpruned", "## Pruned prefill vs unpruned", "## Prune-stage cost", "## Where the prefill time",
                    "## ep_jax vs Hugging Face", "## Targets"):
        assert heading in md
    table = [line for line in md.splitlines() if line.startswith("| entropy |") or line.startswith("| pool |")]
    assert len(table) == 2 + 2  # speed rows + prune-stage rows
    header = next(line for line in md.splitlines() if line.startswith("| method | A (N=576) |"))
    assert table[0].count("|") == table[1].count("|") == header.count("|")
    with Image.open(out / "tiny.png") as im:
        assert im.format == "PNG" and im.size[0] > 600 and im.size[1] > 300


def test_analytic_llava_7b_matches_hand_computation():
    cfg = bench_setup.get_config("7b")
    t = cfg.text
    assert (t.hidden_size, t.intermediate_size, t.num_layers, cfg.image_seq_len) == (4096, 11008, 32, 576)
    assert [b.keep for b in bench_setup.resolve_budgets([192, 128, 64], cfg, 2)] == [166, 98, 29]
    seq, n = 640, 576

    def layer(tokens):  # docs/ALGORITHM.md §6, the reference formula: 8nD² + 4n²D + 6nDM
        return 8 * tokens * 4096**2 + 4 * tokens**2 * 4096 + 6 * tokens * 4096 * 11008

    assert layer(640) == 265_751_101_440  # by hand: 640·404_750_336 + 640²·16_384
    for keep, hand in ((166, 3_350_280_929_280), (98, 2_511_488_286_720), (29, 1_665_006_796_800)):
        row = bench_speed.analytic(cfg, seq, n, 2, keep, bytes_per_elem=2)
        assert row["flops"] == hand == 2 * layer(640) + 30 * layer(640 - n + keep)
        assert row["flops_reduction"] == pytest.approx(1 - hand / (32 * layer(640)), abs=1e-12)
        assert row["flops_speedup"] == pytest.approx(32 * layer(640) / hand, abs=1e-12)
        # KV cache: 2 (k, v) · tokens · 32 heads · 128 · 2 bytes per layer.
        assert row["kv_cache_bytes_analytic"] == 2 * 32 * 128 * 2 * (2 * 640 + 30 * (640 - n + keep))
    assert bench_speed.analytic(cfg, seq, n, None, None, bytes_per_elem=2)["flops"] == 32 * layer(640)
    # CLIP-L/336 up to layer -2 (23 of 24 layers) on 577 tokens, 14 px patches, then the
    # 1024 -> 4096 -> 4096 projector on 576 tokens.
    clip_layer = 8 * 577 * 1024**2 + 4 * 577**2 * 1024 + 4 * 577 * 1024 * 4096
    vision = 2 * 576 * (3 * 14 * 14) * 1024 + 23 * clip_layer + 2 * 576 * 1024 * 4096 + 2 * 576 * 4096**2
    assert vision == 390_193_049_600
    row = bench_speed.analytic(cfg, seq, n, 2, 29, bytes_per_elem=2)
    assert row["vision_flops"] == vision
    assert row["flops_reduction_with_vision"] == pytest.approx(1 - (1_665_006_796_800 + vision) / (32 * layer(640) + vision))


def test_budgets_scale_with_visual_tokens():
    small = bench_setup.get_config("small")  # 256 visual tokens, 32 layers
    got = bench_setup.resolve_budgets([192, 128, 64], small, 2)
    assert [b.avg_keep for b in got] == [85, 57, 28]  # 1/3, 2/9, 1/9 of 256
    assert [b.keep for b in got] == [budget(a, 32, 2, 256) for a in (85, 57, 28)]
    assert bench_setup.parse_budgets("none,192, 64") == (True, [192, 64])
    with pytest.raises(ValueError, match="'x'"):
        bench_setup.parse_budgets("none,x")


def test_compile_subcommand_two_depths(tmp_path, capsys):
    assert bench.main(["compile", "--config", "tiny", "--layers", "2,6", "--dtype", "float32", "--budget", "none",
                       "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "compile.json").read_text())
    rows = res["rows"]
    assert [(r["layout"], r["num_layers"], r["prune"]) for r in rows] == [
        ("stacked", 2, None), ("stacked", 6, None), ("per_layer", 2, None), ("per_layer", 6, None)]
    for r in rows:
        for k in ("prefill_lower_s", "prefill_compile_s", "decode_step_lower_s", "decode_step_compile_s"):
            assert r[k] > 0
    # Abstract parameters: the size is known without allocating it.
    assert rows[1]["abstract_param_bytes"] > rows[0]["abstract_param_bytes"]
    pruned = bench_compile.compile_times("tiny", 20, "float32", 1, 64)
    assert pruned["prune"]["keep"] == bench_setup.resolve_budgets([64], bench_setup.get_config("tiny"), 2)[0].keep
    assert pruned["prefill_compile_s"] > 0 and pruned["decode_step_compile_s"] > 0
    text = (tmp_path / "compile.md").read_text()
    assert "| tiny | stacked | 6 |" in text and "| tiny | per_layer | 6 |" in text
    capsys.readouterr()
    assert bench.main(["compile", "--config", "tiny", "--layouts", "unrolled"]) != 0
    assert "--layouts 'unrolled'" in "".join(capsys.readouterr())


def test_quality_forwards_to_quality_main(monkeypatch):
    seen = []
    fake = types.ModuleType("ep_jax.quality")
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "ep_jax.quality", fake)
    import ep_jax

    monkeypatch.setattr(ep_jax, "quality", fake, raising=False)
    assert bench.main(["quality", "--config", "tiny", "--n", "3"]) == 7
    assert seen == [["--config", "tiny", "--n", "3"]]


@pytest.mark.parametrize("argv, message", [
    (["speed", "--config", "huge"], "unknown bench config"),
    (["speed", "--config", "tiny", "--methods", "entropy,magic"], "--methods"),
    (["speed", "--config", "tiny", "--budgets", "none,999"], "avg_keep"),
])
def test_speed_bad_arguments_fail_clearly(argv, message, capsys):
    assert bench.main(argv) == 2
    assert message in capsys.readouterr().err


def test_random_model_initialisation():
    cfg = bench_setup.get_config("tiny")
    model = bench_setup.random_model(cfg, "float32", seed=1)
    params = model.params()
    assert np.all(np.asarray(params["norm"]["scale"]) == 1)
    assert np.all(np.asarray(params["proj1_bias"]) == 0)
    w = np.asarray(params["layers"]["mlp"]["gate"])
    assert abs(w.std() - 0.02) < 0.002 and abs(w.mean()) < 0.002
