"""Loading and saving models: ep_jax checkpoints (orbax) and Hugging Face directories.

An ep_jax checkpoint directory holds:
  ep_config.json   the model config (ep_jax's dataclasses) and the parameter dtype
  config.json      the Hugging Face config it came from (kept for the export back)
  params/NAME      one orbax checkpoint per parameter (NAME = its key path, e.g. layers.attn.q)
  tokenizer / processor files, copied from the source
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ep_jax import hf
from ep_jax.config import ConfigError, LlavaConfig
from ep_jax.nn.llava import Llava

FORMAT_VERSION = 2  # 2: one orbax checkpoint per parameter under params/
# Files copied along with the weights so that a checkpoint is self-contained.
_SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "preprocessor_config.json", "processor_config.json", "chat_template.json",
    "chat_template.jinja", "generation_config.json",
)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# How the decoder weights sit in memory (checkpoints always store them stacked):
#   stacked    one array per weight, leading layer axis; the layers run under `lax.scan`, so
#              compile time does not depend on depth. XLA:CPU copies each layer's slice before
#              its matmuls read it (`benchmarks/decode_hlo.py`): decode, which reads every weight
#              once per token, pays that copy on every step.
#   per_layer  one buffer per layer and weight; the layer loop is unrolled in the graph, every
#              matmul reads its weights in place; compile time grows with depth.
#   auto       per_layer on CPU when one decoder layer holds at least PER_LAYER_MIN_BYTES of
#              weights (there the copies dominate decode: the 1b bench config, 49 MiB a layer,
#              decodes ~2x faster per_layer, `benchmarks/decode_layout.py`; small layers such as
#              the shipped model's 0.8 MiB ones gain nothing and only compile slower), else
#              stacked (GPU/TPU: the copy is an XLA:CPU behaviour; not measured on a GPU).
LAYOUTS = ("auto", "stacked", "per_layer")
PER_LAYER_MIN_BYTES = 4 << 20


@dataclasses.dataclass
class Model:
    """A loaded model: config, the NNX graph definition and its parameter state, the
    tokenizer/image processor, and a cache of compiled functions."""

    config: LlavaConfig
    graphdef: Any
    state: Any
    path: Path | None = None
    preset: Any = None
    _processor: Any = None
    compiled: dict = dataclasses.field(default_factory=dict)

    @property
    def module(self) -> Llava:
        return nnx.merge(self.graphdef, self.state)

    @property
    def dtype(self):
        return self.state["embed"].value.dtype

    @property
    def processor(self):
        if self._processor is None:
            from ep_jax.processing import Processor

            if self.path is None:
                raise ValueError("this model was built in memory and has no tokenizer/processor files")
            self._processor = Processor.from_dir(self.path, image_seq_len=self.config.image_seq_len)
        return self._processor

    @property
    def layout(self) -> str:
        return "per_layer" if 0 in self.state["layers"] else "stacked"  # nnx.List: keys 0..l-1

    def params(self) -> dict:
        """Parameters as a nested dict of arrays, decoder weights stacked (the checkpoint layout)."""
        params = nnx.to_pure_dict(self.state)
        if self.layout == "per_layer":
            per = params["layers"]
            params["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *(per[i] for i in range(len(per))))
        return params


def decoder_layer_bytes(cfg: LlavaConfig, dtype) -> int:
    """Bytes of one decoder layer's matrices (attention q, k, v, o and the three MLP ones)."""
    t = cfg.text
    attention = t.hidden_size * t.head_dim * (2 * t.num_heads + 2 * t.num_kv_heads)
    return (attention + 3 * t.hidden_size * t.intermediate_size) * jnp.dtype(dtype).itemsize


def resolve_layout(layout: str, cfg: LlavaConfig, dtype) -> str:
    """"auto" -> the layout that suits this backend and model (see LAYOUTS); others checked."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if layout == "auto":
        big = decoder_layer_bytes(cfg, dtype) >= PER_LAYER_MIN_BYTES
        return "per_layer" if big and jax.default_backend() == "cpu" else "stacked"
    return layout


def _unstack(stacked: dict, num_layers: int) -> dict:
    """Stacked decoder weights {name: [l, ...]} -> {i: {name: [...]}}, leaf by leaf: each stacked
    array is dropped from `stacked` once split, so memory holds one extra weight at a time."""
    per: dict = {i: {} for i in range(num_layers)}
    for keys in list(_leaf_paths(stacked)):
        whole = hf._get(stacked, keys)
        hf._set(stacked, keys, None)
        for i in range(num_layers):
            hf._set(per[i], keys, jnp.array(whole[i]))
        del whole
    return per


def _dtype(name: str | None, default):
    if name is None:
        return default
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not supported; choose one of {sorted(DTYPES)}") from None


def abstract_model(cfg: LlavaConfig, dtype, layout: str = "stacked") -> tuple[Any, Any]:
    """(graphdef, abstract state) without allocating any parameter."""
    abstract = nnx.eval_shape(lambda: Llava(cfg, dtype=dtype, rngs=nnx.Rngs(0), layout=layout))
    return nnx.split(abstract)


def init_model(cfg: LlavaConfig, dtype=jnp.float32, seed: int = 0) -> Model:
    """A randomly initialised model (benchmarks, training), stacked layout."""
    graphdef, state = nnx.split(Llava(cfg, dtype=dtype, rngs=nnx.Rngs(seed)))
    return Model(cfg, graphdef, state)


def from_params(cfg: LlavaConfig, params: dict, dtype, path: Path | None = None, layout: str = "auto") -> Model:
    """A Model from checkpoint-layout parameters (decoder weights stacked); `params` is consumed
    when the layout is per_layer."""
    layout = resolve_layout(layout, cfg, dtype)
    if layout == "per_layer":
        params = {**params, "layers": _unstack(params["layers"], cfg.text.num_layers)}
    graphdef, state = abstract_model(cfg, dtype, layout)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return Model(cfg, graphdef, state, path=path)


def with_layout(model: Model, layout: str) -> Model:
    """The same weights in another layout (a new Model; the stacked arrays are split or joined)."""
    layout = resolve_layout(layout, model.config, model.dtype)
    if layout == model.layout:
        return model
    moved = from_params(model.config, model.params(), model.dtype, model.path, layout)
    return dataclasses.replace(model, graphdef=moved.graphdef, state=moved.state, compiled={})


def _shapes(state) -> dict:
    return jax.tree.map(lambda a: tuple(a.shape), nnx.to_pure_dict(state))


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").exists() and (
        (path / "model.safetensors.index.json").exists() or any(path.glob("*.safetensors"))
    )


def is_ep_dir(path: Path) -> bool:
    return (path / "ep_config.json").exists() and (path / "params").exists()


def read_hf(src: str | Path, dtype: str | None = None, progress: bool = False) -> tuple[LlavaConfig, dict]:
    """Config and ep_jax-layout parameters (numpy) of a Hugging Face LLaVA directory."""
    src = Path(src)
    cfg = LlavaConfig.from_json(src / "config.json")
    np_dtype = np.dtype(_dtype(dtype, jnp.float32))
    _, state = abstract_model(cfg, np_dtype)
    report = None
    if progress:
        total = len(hf._expand(hf.weight_table(cfg)))
        count = [0]

        def report(name):
            count[0] += 1
            if count[0] % 50 == 0 or count[0] == total:
                print(f"  read {count[0]}/{total} tensors", file=sys.stderr, flush=True)

    params = hf.read_hf_weights(src, cfg, _shapes(state), np_dtype, progress=report)
    return cfg, params


def load(path: str | Path, dtype: str | None = None, layout: str = "auto") -> Model:
    """Load an ep_jax checkpoint, or a Hugging Face LLaVA directory (converted in memory).
    `layout`: how the decoder weights sit in memory (`LAYOUTS`; the default suits the backend)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if is_ep_dir(path):
        meta = json.loads((path / "ep_config.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"{path} has checkpoint format {meta.get('format_version')}, expected {FORMAT_VERSION}")
        cfg = LlavaConfig.from_json_dict(meta["config"])
        saved = _dtype(meta["dtype"], jnp.float32)
        target = _dtype(dtype, saved)
        graphdef, abstract = abstract_model(cfg, saved)
        params = _restore(path / "params", nnx.to_pure_dict(abstract))
        if target != saved:
            params = jax.tree.map(lambda a: a.astype(target), params)
        return from_params(cfg, params, target, path, layout)
    if is_hf_dir(path):
        cfg, params = read_hf(path, dtype)
        return from_params(cfg, params, _dtype(dtype, jnp.float32), path, layout)
    raise hf.CheckpointError(
        f"{path} is neither an ep_jax checkpoint (ep_config.json + params/) nor a Hugging Face "
        "LLaVA directory (config.json + *.safetensors)"
    )


def _leaf_paths(tree: dict, prefix: tuple[str, ...] = ()):
    """Key paths of every leaf, e.g. ("layers", "attn", "q"); saved as "layers.attn.q"."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaf_paths(value, (*prefix, key))
        else:
            yield (*prefix, key)


def _restore(path: Path, abstract: dict) -> dict:
    """Restore parameter by parameter (each is its own orbax checkpoint under params/)."""
    import orbax.checkpoint as ocp

    params: dict = {}
    with ocp.StandardCheckpointer() as ckpt:
        for keys in _leaf_paths(abstract):
            name = ".".join(keys)
            leaf = hf._get(abstract, keys)
            target = {"value": jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)}
            if not (path / name).exists():
                raise hf.CheckpointError(f"{path} has no saved parameter {name!r}: the checkpoint is incomplete")
            hf._set(params, keys, ckpt.restore((path / name).absolute(), target)["value"])
    return params


def _save_params(params: dict, path: Path, consume: bool = False) -> None:
    """One orbax checkpoint per parameter: orbax's serialisation copies cost about one
    parameter at a time instead of the whole model (measured: 0.85x of what is saved at once),
    which is what keeps converting a 7B model inside 24 GiB. With `consume`, each leaf is
    dropped from `params` once written, so memory falls as the save proceeds."""
    import orbax.checkpoint as ocp

    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        for keys in list(_leaf_paths(params)):
            name = ".".join(keys)
            leaf = jax.device_put(hf._get(params, keys))
            if consume:
                hf._set(params, keys, None)
            ckpt.save((path / name).absolute(), {"value": leaf})
            ckpt.wait_until_finished()
            del leaf


def save(cfg: LlavaConfig, params: dict, dst: str | Path, *, src: str | Path | None = None,
         hf_config: dict | None = None, consume: bool = False) -> Path:
    """Write an ep_jax checkpoint; tokenizer/processor files are copied from `src`.
    `consume=True` empties `params` while saving (conversion of large models)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if (dst / "params").exists():
        shutil.rmtree(dst / "params")
    dtype = str(jax.tree.leaves(params)[0].dtype)
    _save_params(params, dst / "params", consume=consume)
    meta = {"format_version": FORMAT_VERSION, "dtype": dtype, "config": cfg.to_json_dict()}
    (dst / "ep_config.json").write_text(json.dumps(meta, indent=1))
    (dst / "config.json").write_text(json.dumps(hf_config or cfg.to_hf_dict(), indent=1))
    if src is not None:
        copy_side_files(src, dst)
    return dst


def copy_side_files(src: str | Path, dst: str | Path) -> None:
    for name in _SIDE_FILES:
        f = Path(src) / name
        if f.exists() and f.resolve() != (Path(dst) / name).resolve():
            shutil.copy(f, Path(dst) / name)


def convert_hf(src: str | Path, dst: str | Path, dtype: str = "float32", progress: bool = True) -> Path:
    """HF LLaVA directory -> ep_jax checkpoint, streaming tensors shard by shard."""
    src = Path(src)
    cfg, params = read_hf(src, dtype, progress=progress)
    hf_config = json.loads((src / "config.json").read_text())
    return save(cfg, params, dst, src=src, hf_config=hf_config, consume=True)


def export_hf(model_or_path, dst: str | Path, max_shard_bytes: int = 2 << 30) -> Path:
    """ep_jax checkpoint -> HF directory in the hub layout that transformers loads."""
    from safetensors.numpy import save_file

    model = model_or_path if isinstance(model_or_path, Model) else load(model_or_path)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    params = jax.tree.map(np.asarray, model.params())
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in hf.iter_hf_export(params, model.config):
        if size + arr.nbytes > max_shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dst / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": sum(a.nbytes for s in shards for a in s.values())}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    hf_config = model.config.to_hf_dict()
    if model.path is not None and (model.path / "config.json").exists():
        hf_config = json.loads((model.path / "config.json").read_text())
    hf_config["torch_dtype"] = str(model.dtype)
    (dst / "config.json").write_text(json.dumps(hf_config, indent=1))
    if model.path is not None:
        copy_side_files(model.path, dst)
    return dst
