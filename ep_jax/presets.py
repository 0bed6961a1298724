"""Model presets: per-checkpoint defaults (chat template, pruning layer K, budgets).

One JSON file per supported checkpoint lives in `models/` at the repository root (or in the
directory named by $EP_JAX_MODELS). A checkpoint directory may also carry its own
`ep_preset.json`, which wins. A preset says where its K comes from: "paper" (the published
setting) or "measured" (by `python -m ep_jax.ecl` on this code).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from ep_jax.errors import ConfigError


class PresetError(ConfigError):
    """A preset file that cannot be read, or a preset that does not exist."""


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    hf_id: str | None = None
    template: str = "vicuna_v1"
    prune_layer: int | None = None  # K, the Entropy Collapse Layer setting
    prune_layer_source: str | None = None  # "paper" | "measured"
    default_avg_keep: int | None = None  # A used when the user gives no budget
    default_keep_ratio: float | None = None  # or a layer-averaged fraction of each example's N
    budgets: tuple[int, ...] = ()  # A values of the published tables
    match: dict[str, Any] = dataclasses.field(default_factory=dict)  # config fields that identify it
    supported: bool = True  # False: listed for its settings; ep_jax cannot run it yet
    default: bool = False  # the shipped model `python -m ep_jax.generate` uses without --model
    notes: str = ""
    profile: dict[str, Any] | None = None  # measured entropy profile (python -m ep_jax.ecl)
    path: Path | None = None

    @classmethod
    def from_file(cls, path: Path) -> "Preset":
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PresetError(f"cannot read preset {path}: {e}") from None
        d["budgets"] = tuple(d.get("budgets", ()))
        fields = {f.name for f in dataclasses.fields(cls)} - {"path"}
        unknown = set(d) - fields
        if unknown:
            raise PresetError(f"preset {path} has unknown fields {sorted(unknown)}")
        return cls(**d, path=path)

    def to_file(self, path: Path) -> None:
        d = dataclasses.asdict(self)
        d.pop("path")
        d["budgets"] = list(self.budgets)
        path.write_text(json.dumps(d, indent=1) + "\n")


def models_dir() -> Path:
    env = os.environ.get("EP_JAX_MODELS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "models"


def all_presets() -> dict[str, Preset]:
    root = models_dir()
    files = sorted(root.glob("*.json")) + sorted(root.glob("*/preset.json"))
    return {p.name: p for p in (Preset.from_file(f) for f in files)}


def get(name: str) -> Preset:
    presets = all_presets()
    try:
        return presets[name]
    except KeyError:
        raise PresetError(f"unknown preset {name!r}; known: {sorted(presets)}") from None


def for_model(path: str | Path, cfg, family=None) -> Preset | None:
    """The preset of a checkpoint: its own ep_preset.json or preset.json (a model shipped under
    models/<name>/), else one of `models/*.json` whose `match` fits the config."""
    for own in (Path(path) / "ep_preset.json", Path(path) / "preset.json"):
        if own.exists():
            return Preset.from_file(own)
    if family is None:
        from ep_jax.families import get

        family = get("llava")
    flat = family.preset_fields(cfg)
    for preset in all_presets().values():
        if preset.match and all(flat.get(k) == v for k, v in preset.match.items()):
            return preset
    return None


def default_model_path() -> Path:
    """The small model shipped with ep_jax (models/<name>/ with "default": true in preset.json)."""
    for preset in all_presets().values():
        if preset.default and preset.path is not None and preset.path.name == "preset.json":
            return preset.path.parent
    raise PresetError(
        "no shipped model found under models/; pass --model PATH (an ep_jax checkpoint or a Hugging Face "
        "LLaVA directory; see README 'Converting a checkpoint')"
    )


def save_measured(model_path: str | Path, cfg, preset: Preset | None, layer: int,
                  profile: dict[str, Any]) -> Path:
    """Store a measured Entropy Collapse Layer (`python -m ep_jax.ecl --write-preset`).

    The model's preset (`for_model`: its own ep_preset.json, or the models/ file whose `match`
    fits) gets `prune_layer=layer`, `prune_layer_source="measured"` and the profile, in place.
    Without one, `ep_preset.json` is written into the checkpoint directory. Returns the file.
    """
    if preset is None:
        preset = for_model(model_path, cfg)
    shipped = Path(model_path) / "preset.json"  # a model shipped under models/<name>/
    if preset is None and shipped.exists():
        preset = Preset.from_file(shipped)
    if preset is None or preset.path is None:
        path = Path(model_path) / "ep_preset.json"
        preset = Preset(name=Path(model_path).resolve().name, match={})
    else:
        path = preset.path
    updated = dataclasses.replace(preset, prune_layer=int(layer), prune_layer_source="measured", profile=profile)
    updated.to_file(path)
    return path
