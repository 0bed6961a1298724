"""Targets, the markdown table and the PNG plot of a `speed` run (from its `bench.json` dict)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ep_jax.core import flops
from ep_jax.config import LlavaConfig

# Dense bf16/fp16 tensor-core peak FLOP/s by device kind (vendor data sheets, no sparsity).
PEAK_BF16 = (
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12),
    ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("V100", 125e12),
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
    if dtype not in ("bfloat16", "float16"):
        return None
    for name, peak in PEAK_BF16:
        if name.lower() in device_kind.lower():
            return peak
    return None


def mfu(result: dict[str, Any]) -> dict[str, Any] | None:
    """Model FLOPs utilisation of the unpruned prefill, two ways: XLA's FLOP count of the whole
    compiled prefill over its time, and the analytic decoder FLOPs (`flops.py`, the reference's
    formula) over the prefill time minus the vision tower."""
    base = next((r for r in result["rows"] if r["method"] == "none"), None)
    peak = peak_flops(result["machine"]["device_kind"], result["dtype"])
    if base is None or peak is None:
        return None
    seconds = base["prefill_ms"] / 1e3
    decoder_s = (base["prefill_ms"] - result["vision_ms"]) / 1e3
    batch = result["prompt"]["batch"]
    return {
        "peak_flops": peak,
        "xla": None if base["xla_flops"] is None else base["xla_flops"] / seconds / peak,
        "decoder_formula": batch * base["flops"] / decoder_s / peak,
    }


def _target(name, value, threshold, less, applies, scope):
    met = None if value is None else (value <= threshold if less else value >= threshold)
    return {"target": name, "value": value, "threshold": threshold, "comparison": "<=" if less else ">=",
            "met": met, "applies_here": applies, "scope": scope}


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, evaluated on this run; `applies_here` says whether this run is the
    configuration the target is stated for."""
    cpu = result["machine"]["backend"] == "cpu"
    name = result["config"]
    rows = result["rows"]
    out = []
    a64 = next((r for r in rows if r["method"] == "entropy" and r["budget"] == "64"), None)
    out.append(_target(
        "prefill time reduction at A=64 (entropy) / analytic FLOPs reduction", a64 and a64.get("realised"), 0.8,
        False, (cpu and name == "1b") or (not cpu and name == "7b"), "1b on CPU, 7b on GPU"))
    out.append(_target(
        "same, against the whole prefill's analytic reduction (vision tower + projector FLOPs added)",
        a64 and a64.get("realised_with_vision"), 0.8,
        False, (cpu and name == "1b") or (not cpu and name == "7b"), "1b on CPU, 7b on GPU"))
    ent = [s for s in result["scoring"] if s["method"] == "entropy"]
    worst = max((s["stage_pct_of_prefill"] for s in ent), default=None)
    out.append(_target("entropy prune stage, % of pruned prefill (worst budget)", worst, 3.0 if cpu else 1.0, True,
                       cpu or name == "7b", "<= 3% on CPU, <= 1% on GPU 7b"))
    hf = result.get("vs_hf")
    out.append(_target("unpruned prefill time ep_jax / HF PyTorch", hf and hf["prefill_ratio"], 1.0, True, cpu,
                       "CPU, side by side"))
    out.append(_target("unpruned decode time per token ep_jax / HF PyTorch", hf and hf["decode_ratio"], 1.0, True,
                       cpu, "CPU, side by side"))
    m = result.get("mfu")
    out.append(_target("unpruned prefill MFU (XLA FLOP count)", m and m["xla"], 0.5, False,
                       (not cpu) and name == "7b" and result["dtype"] == "bfloat16", "GPU, 7b, bfloat16"))
    for t in out:
        if t["value"] is not None and isinstance(t["value"], float):
            t["value"] = round(t["value"], 4)
    return out


def explain(result: dict[str, Any]) -> str | None:
    """A sentence on what the profile says about the gap between measured and analytic."""
    prof = result.get("profile") or {}
    if "none" not in prof or len(prof) < 2:
        return None
    name = next(k for k in prof if k != "none")
    u, p = prof["none"]["parts_ms"], prof[name]["parts_ms"]
    fixed = ("vision_tower", "embed_merge", "kv_cache_build", "norm_lm_head")
    fixed_u = sum(u[k] for k in fixed)
    dec_u = u["layers_before_K"] + u["layers_from_K"]
    dec_p = p["layers_before_K"] + p["layers_from_K"] + p["prune_stage"]
    row = next(r for r in result["rows"] if f"{r['method']}@{r['budget']}" == name)
    analytic = row["flops_reduction"]
    dec_realised = (1 - dec_p / dec_u) / analytic
    whole = (1 - prof[name]["sum_ms"] / prof["none"]["sum_ms"]) / analytic
    g = prof["none"]["gflops_per_s"], prof[name]["gflops_per_s"]
    return (
        f"Profile ({name}): the costs pruning cannot touch and the formula does not count (vision tower "
        f"{u['vision_tower']:.1f} ms, embedding/merge {u['embed_merge']:.1f}, "
        f"KV-cache build {u['kv_cache_build']:.1f}, "
        f"norm + LM head {u['norm_lm_head']:.1f}) are {100 * fixed_u / prof['none']['sum_ms']:.1f}% of the unpruned "
        f"sum of parts. The decoder layers alone (plus the prune stage) realise {100 * dec_realised:.0f}% of the "
        f"analytic reduction: layers from K run at {g[1]['layers_from_K']:.1f} GFLOP/s on "
        f"{prof[name]['tokens_from_K']} tokens vs {g[0]['layers_from_K']:.1f} on {prof['none']['tokens_from_K']}, "
        f"and the {result['layer']} layers before K cost {p['layers_before_K']:.1f} ms. Sum of parts realises "
        f"{100 * whole:.0f}%."
    )


# ------------------------------------------------------------------------------- markdown
def _mib(b):
    return "–" if b is None else f"{b / 2**20:.1f}"


def _f(x, fmt="{:.1f}"):
    return "–" if x is None else fmt.format(x)


def _pct(x, fmt):
    return "–" if x is None else fmt.format(100 * x)


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    p = result["prompt"]
    model = result["model"]
    lines = [
        f"# ep_jax speed: `{result['config']}` on {m['device_kind']} ({result['dtype']})",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m['cpu']} ({m['cpu_affinity']} cores usable), {m['backend']} backend, device "
        f"`{m['device_kind']}`; jax {m['jax']}, jaxlib {m['jaxlib']}; {result['timestamp']}  ",
        f"Model: {model['vision']}; {model['decoder']}; {model['params'] / 1e9:.3f} B parameters, random weights; "
        f"decoder weights `{result.get('layout', 'stacked')}` (`runtime.model.LAYOUTS`)  ",
        f"Prompt: a real photo + the LLaVA-1.5 chat prompt = {p['tokens']} tokens ({p['visual_tokens']} visual, "
        f"{p['text_tokens']} text), batch {p['batch']}, "
        + ("exact length (no bucket padding)" if p["padding"] == "exact" else
           f"**left-padded to the {p['padded_length']}-token bucket** as `ep_jax.generate` does (FLOPs columns "
           "count the real tokens only)")
        + f". Prune layer K = "
        f"{result['layer']}.  ",
        f"Each time is the median of {result['runs']} runs after {result['warmup']} warm-up, synchronised "
        "(`block_until_ready`); compile time excluded and listed separately.  ",
    ]
    if result.get("quiet_cpu") is False:
        lines.append("**Warning: other CPU-heavy processes ran during this measurement, so its times are "
                     "contaminated:** " + "; ".join(f"`{p}`" for p in result.get("other_cpu_load", [])) + "  ")
    base = next((r for r in result["rows"] if r["method"] == "none"), None)
    if base is not None:
        lines += [
            "",
            "## Unpruned",
            "",
            f"| vision tower + projector ms | prefill ms | time to first token ms | decode tok/s "
            f"({result['max_new_tokens']} new) | "
            "KV cache MiB | peak memory MiB | prefill compile s |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {result['vision_ms']:.1f} | {base['prefill_ms']:.1f} | {base['ttft_ms']:.1f} | "
            f"{_f(base.get('decode_tokens_per_s'), '{:.2f}')} | {_mib(base['kv_cache_bytes'])} | "
            f"{_mib(base['peak_memory_bytes'])} | {base['compile_s']:.1f} |",
            "",
            f"Peak memory: {base['peak_memory_source']}. Time to first token = host preprocessing (image + "
            "prompt) + prefill + first greedy token.",
        ]
    lines += [
        "",
        "## Pruned prefill vs unpruned, measured in the same run",
        "",
        "*speedup* = unpruned prefill ms / pruned prefill ms (measured); *FLOPs speedup* = analytic "
        "(`ep_jax/core/flops.py`, docs/ALGORITHM.md §6, decoder only); *realised* = measured time reduction / analytic FLOPs "
        "reduction. The measured prefill includes the vision tower, which pruning cannot shorten and the "
        "reference formula does not count: *FLOPs red. +vision* adds its FLOPs (`flops.vision_flops`) to both "
        "sides, and *realised +vision* is measured against that.",
        "",
        "| method | A (N=576) | A used | R | tokens after K | prefill ms | speedup | FLOPs speedup | "
        "FLOPs reduction | time reduction | realised | FLOPs red. +vision | realised +vision | TTFT ms | "
        "decode tok/s | KV MiB | compile s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['budget']} | {_f(r['avg_keep'], '{}')} ({r['effective_avg_keep']:.1f}) | "
            f"{r['keep']} | {r['tokens_after_prune']} | {r['prefill_ms']:.1f} | "
            f"{_f(r.get('prefill_speedup'), '{:.2f}x')} | "
            f"{r['flops_speedup']:.2f}x | {100 * r['flops_reduction']:.1f}% | "
            f"{_pct(r.get('time_reduction'), '{:.1f}%')} | "
            f"{_pct(r.get('realised'), '{:.0f}%')} | {100 * r['flops_reduction_with_vision']:.1f}% | "
            f"{_pct(r.get('realised_with_vision'), '{:.0f}%')} | {r['ttft_ms']:.1f} | "
            f"{_f(r.get('decode_tokens_per_s'), '{:.2f}')} | {_mib(r['kv_cache_bytes'])} | {r['compile_s']:.1f} |")
    which = {"ends": "for the unpruned model and the smallest R", "all": "once per R",
             "none": "not at all"}[result["decode_measured_for"]]
    lines += ["", "Decode cost depends only on R (the cache shapes are the same for every method); it is measured "
              f"{which} (first method listed), greedy, {result['max_new_tokens']} new tokens.", ""]
    if result["scoring"]:
        lines += [
            "## Prune-stage cost",
            "",
            "Timed in isolation under `jit` on this prompt's real layer K-1 tensors (queries, keys, hidden): "
            "*scorer* = the method's scores only; *stage* = scores + masked top-k + gather of the kept rows "
            "(all the pruned prefill adds). % of the same row's pruned prefill. *prefill − pool* = difference of "
            "the whole prefill against the `pool` scorer (constant scores) at the same R, when measured: the "
            "in-graph cost, noisier.",
            "",
            "| method | A | R | scorer ms | stage ms | stage % of prefill | prefill − pool ms |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for s in result["scoring"]:
            lines.append(f"| {s['method']} | {s['budget']} | {s['keep']} | {s['score_ms']:.2f} | {s['stage_ms']:.2f} | "
                         f"{s['stage_pct_of_prefill']:.2f}% | {_f(s['prefill_minus_pool_ms'], '{:.1f}')} |")
        lines.append("")
    if result.get("profile"):
        names = list(result["profile"])
        parts = list(next(iter(result["profile"].values()))["parts_ms"])
        lines += [
            "## Where the prefill time goes (components timed separately, ms)",
            "",
            "| component | " + " | ".join(names) + " |",
            "|---|" + "---:|" * len(names),
        ]
        for part in parts:
            cells = " | ".join(f"{result['profile'][n]['parts_ms'][part]:.1f}" for n in names)
            lines.append(f"| {part} | {cells} |")
        lines.append("| **sum** | " + " | ".join(f"{result['profile'][n]['sum_ms']:.1f}" for n in names) + " |")
        cells = " | ".join(f"{prof['tokens_before_K']} / {prof['tokens_from_K']}"
                           for prof in (result["profile"][n] for n in names))
        lines.append(f"| tokens before / from K | {cells} |")
        for seg in ("layers_before_K", "layers_from_K"):
            lines.append(f"| {seg} GFLOP/s (analytic) | " + " | ".join(
                f"{result['profile'][n]['gflops_per_s'][seg]:.1f}" for n in names) + " |")
        if result.get("explain"):
            lines += ["", result["explain"]]
        lines.append("")
    hf = result.get("vs_hf")
    if hf:
        lines += [
            "## ep_jax vs Hugging Face transformers (PyTorch), unpruned, same weights, same process",
            "",
            f"transformers {hf['transformers']}, torch {hf['torch']} ({hf['torch_threads']} threads); "
            f"{hf['xla_threads']}. Same inputs; timed calls alternate between the two frameworks (HF, ep_jax, "
            "HF, ...) so both see the same machine state; ep_jax = the compiled prefill / decode loop of the table "
            "above, HF decode = a greedy loop over its KV cache, "
            f"{result['max_new_tokens']} new tokens. Last-token logits max |diff| = "
            f"{_f(hf['last_logits_max_abs_diff'], '{:.2e}')}.",
            "",
            "| | ep_jax | HF PyTorch | ratio ep_jax / HF |",
            "|---|---:|---:|---:|",
            f"| prefill ms | {hf['ep_jax_prefill_ms']:.1f} | {hf['hf_prefill_ms']:.1f} | {hf['prefill_ratio']:.2f} |",
            f"| decode ms / token | {_f(hf['ep_jax_decode_ms_per_step'])} | {hf['hf_decode_ms_per_step']:.1f} | "
            f"{_f(hf['decode_ratio'], '{:.2f}')} |",
            "",
        ]
    if result.get("mfu"):
        mm = result["mfu"]
        lines += ["## MFU (unpruned prefill)", "",
                  f"peak {mm['peak_flops'] / 1e12:.0f} TFLOP/s; XLA-counted FLOPs: {_pct(mm['xla'], '{:.1f}%')}; "
                  f"analytic decoder FLOPs over prefill − vision time: {100 * mm['decoder_formula']:.1f}%", ""]
    lines += ["## Targets", "", "| target | value | threshold | met | applies to this run | stated for |",
              "|---|---:|---:|---|---|---|"]
    for t in result["targets"]:
        met = "–" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {_f(t['value'], '{:.3f}')} | {t['comparison']} {t['threshold']} | {met} | "
                     f"{'yes' if t['applies_here'] else 'no'} | {t['scope']} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- plot
def plot(result: dict[str, Any], cfg: LlavaConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = result["prompt"]
    seq, n, layer = p["tokens"], p["visual_tokens"], result["layer"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    keeps = list(range(0, n + 1, max(1, n // 96)))
    unpruned = flops.prefill_flops(cfg.text, seq)
    ax.plot(keeps, [unpruned / flops.prefill_flops(cfg.text, seq, n, layer, r) for r in keeps], "k--",
            label="analytic FLOPs speedup")
    markers = {"entropy": "o", "fastv": "s", "random": "^", "pool": "D"}
    for method in dict.fromkeys(r["method"] for r in result["rows"] if r["method"] != "none"):
        pts = [(r["keep"], r["prefill_speedup"]) for r in result["rows"]
               if r["method"] == method and r.get("prefill_speedup") is not None]
        if pts:
            ax.plot(*zip(*sorted(pts)), marker=markers.get(method, "x"), linestyle="-", label=f"measured: {method}")
    ax.plot([n], [1.0], "k*", markersize=10, label="unpruned")
    ax.set_xlabel(f"visual tokens retained after layer K={layer} (R of N={n})")
    ax.set_ylabel("prefill speedup vs unpruned")
    ax.set_title(f"{result['config']} · {result['machine']['device_kind']} · {result['dtype']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    ax = axes[1]
    prof = result.get("profile") or {}
    if prof:
        names = list(prof)
        bottom = [0.0] * len(names)
        for part in next(iter(prof.values()))["parts_ms"]:
            vals = [prof[k]["parts_ms"][part] for k in names]
            ax.bar(names, vals, bottom=bottom, label=part)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_ylabel("ms (components timed separately)")
        ax.set_title("where the prefill time goes")
        ax.legend(fontsize=8)
    else:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
