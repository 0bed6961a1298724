"""`python -m ep_jax.ecl`: measure the Entropy Collapse Layer of a model over calibration
images (`ep_jax/analysis/ecl.py`), write profile.json / profile.png and, optionally, the preset."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ep_jax.analysis.ecl import (
    DEFAULT_MIN_REL_DROP, DEFAULT_PROMPT, SOURCES, EclResult, EntropyProfile, find_ecl, profile_images,
)
from ep_jax.analysis.ecl_report import format_table, plot_profile
from ep_jax.cli import add_mesh_argument, run_cli
from ep_jax.errors import InputError
from ep_jax.files import check_output_dir, write_text
from ep_jax.runtime.sharding import mesh_from_flag, parse_mesh

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ep_jax.ecl",
        description="Measure the Entropy Collapse Layer of a vision-language model: the per-layer matrix entropy of the "
        "visual tokens over calibration images, and the pruning layer K it implies.",
    )
    p.add_argument("--model", help="ep_jax checkpoint or Hugging Face LLaVA directory "
                   "(default: the small model shipped with ep_jax)")
    p.add_argument("--image", nargs="+", action="extend", required=True, metavar="FILE",
                   help="calibration image(s); several files, or repeat the flag")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"question asked with every image (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--out", default="ecl_out", help="directory for profile.json and profile.png (default: ecl_out)")
    p.add_argument("--write-preset", action="store_true",
                   help="store K and the profile in the model's preset (models/*.json that matches the model, "
                   "else ep_preset.json in the checkpoint directory)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward (default 1)")
    p.add_argument("--max-layer", type=int, default=None, help="last candidate K (default max(2, L // 4))")
    p.add_argument("--min-drop", type=float, default=DEFAULT_MIN_REL_DROP,
                   help=f"minimum relative one-step drop that counts as a collapse (default {DEFAULT_MIN_REL_DROP})")
    p.add_argument("--source", choices=SOURCES, default="query", help="token-wise score source (default query)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="parameter dtype (default: as saved)")
    p.add_argument("--template", default=None, help="chat template (default: the model preset's, vicuna_v1)")
    add_mesh_argument(p)
    return p


def main(argv=None) -> int:
    return run_cli(build_parser(), _run, argv)


def _run(args) -> int:
    from ep_jax import presets
    from ep_jax.checkpoint import load
    from ep_jax.image_files import load_image

    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size}: use an int >= 1")
    if args.max_layer is not None and args.max_layer < 1:
        raise InputError(f"--max-layer {args.max_layer}: use an int >= 1")
    if not 0 <= args.min_drop < 1:
        raise InputError(f"--min-drop {args.min_drop}: use a fraction in [0, 1)")
    if args.mesh is not None:
        parse_mesh(args.mesh)  # a bad flag is refused before anything loads
    check_output_dir(args.out, "--out")
    images = [load_image(Path(f)) for f in args.image]  # unreadable files fail before the model loads
    model_path = args.model
    if model_path is None:
        model_path = presets.default_model_path()
        print(f"using the shipped model {model_path} (pass --model for another)", file=sys.stderr)
    model_path = Path(model_path)
    model = load(model_path, dtype=args.dtype, mesh=mesh_from_flag(args.mesh))
    template = args.template or getattr(model.preset, "template", None) or model.family.default_template

    profile = profile_images(model, images, args.prompt, template=template, batch_size=args.batch_size,
                             source=args.source)
    result = find_ecl(profile, max_layer=args.max_layer, min_rel_drop=args.min_drop)
    result.profile = profile

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "model": str(model_path),
        "preset": None if model.preset is None else model.preset.name,
        "prompt": args.prompt,
        "template": template,
        "images": [str(f) for f in args.image],
        "profile": profile.to_dict(),
        "ecl": result.to_dict(),
    }
    write_text(out / "profile.json", json.dumps(doc, indent=1) + "\n")
    plot_profile(profile, result, out / "profile.png", title=f"{model_path.name}: {len(images)} image(s)")

    print(format_table(profile, result))
    print()
    print(f"K = {result.layer if result.found else 'none'} ({result.status}); {result.message}")
    print(f"wrote {out / 'profile.json'} and {out / 'profile.png'}")
    if args.write_preset:
        if not result.found:
            raise InputError("no entropy collapse found, so no K was written to the preset; "
                             "lower --min-drop or set the prune layer by hand")
        written = presets.save_measured(model_path, model.config, model.preset, result.layer,
                                        _preset_profile(profile, result, args))
        print(f"stored K = {result.layer} (measured) in {written}")
    return 0


def _preset_profile(profile: EntropyProfile, result: EclResult, args) -> dict[str, Any]:
    """What a preset keeps of a measurement: the mean curves and the rule's verdict."""
    d = profile.to_dict(per_example=False)
    d["ecl"] = {k: v for k, v in result.to_dict().items() if k not in ("curve", "per_example")}
    d["prompt"] = args.prompt
    return d


