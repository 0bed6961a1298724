"""Loading and saving models: ep_jax checkpoints (orbax) and Hugging Face directories.

An ep_jax checkpoint directory holds:
  ep_config.json   the model config (ep_jax's dataclasses) and the parameter dtype
  config.json      the Hugging Face config it came from (kept for the export back)
  params/          one orbax checkpoint of the nested parameter dict (format 3; format 2, one
                   checkpoint per parameter under params/NAME, still loads), with the float64
                   sum of every parameter as custom metadata (checked at load)
  tokenizer / processor files, copied from the source

Writers (`convert_hf`, `save`, `export_hf`) build the output in a temporary folder beside it and
rename it into place only when complete: an interrupted or failed write leaves DST as it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ep_jax import hf
from ep_jax.errors import CheckpointError, ConfigError, EpJaxError, InputError, OutputPathError
from ep_jax.families import family_of
from ep_jax.families import get as get_family
from ep_jax.files import interrupts_after, staged_folder
from ep_jax.runtime.model import DTYPES, LAYOUTS, Model, abstract_model, from_params
from ep_jax.runtime.model import dtype_of as _dtype

FORMAT_VERSION = 3  # 3: params/ is one orbax checkpoint of the whole nested parameter dict
READ_FORMATS = (2, 3)  # 2: one orbax checkpoint per parameter, params/NAME (restoring ~30 costs ~1 s)
# Files copied along with the weights so that a checkpoint is self-contained.
_SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "preprocessor_config.json", "processor_config.json", "chat_template.json",
    "chat_template.jinja", "generation_config.json",
)
def _shapes(state) -> dict:
    return jax.tree.map(lambda a: tuple(a.shape), nnx.to_pure_dict(state))


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        (path / "model.safetensors.index.json").is_file() or any(path.glob("*.safetensors"))
    )


def is_ep_dir(path: Path) -> bool:
    return (path / "ep_config.json").is_file()


def read_hf(src: str | Path, dtype: str | None = None, progress: bool = False) -> tuple[Any, dict]:
    """Config and ep_jax-layout parameters (numpy) of a Hugging Face directory of any family;
    the config's fields are checked (`_config_from_hf`), every tensor is checked finite as it is
    read (`hf.check_finite`)."""
    src = Path(src)
    family = hf_family(src)
    cfg = _config_from_hf(family, src / "config.json")
    np_dtype = np.dtype(_dtype(dtype, jnp.float32))
    _, state = abstract_model(family, cfg, np_dtype)
    report = None
    if progress:
        total = family.hf_tensor_count(cfg)
        count = [0]

        def report(name):
            count[0] += 1
            if count[0] % 50 == 0 or count[0] == total:
                print(f"  read {count[0]}/{total} tensors", file=sys.stderr, flush=True)

    params = family.read_hf_weights(src, cfg, _shapes(state), np_dtype, progress=report)
    return cfg, params


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} holds a JSON {type(d).__name__}, not an object")
    return d


def _config_from_hf(family, path: Path):
    """The family's config of a config.json: ConfigError naming the field for a malformed one
    (LLaVA: every field its config reads is type-checked first, `hf.parse_config`)."""
    d = _read_json(path)
    if family.name == "llava":
        return hf.parse_config(d, path)
    try:
        return family.config_from_hf(d)
    except EpJaxError:
        raise
    except (KeyError, AttributeError, TypeError, ValueError, ZeroDivisionError) as e:
        raise ConfigError(f"{path} has a malformed field ({type(e).__name__}: {e})",
                          fix="restore it from the original checkpoint") from None


def hf_family(path: Path):
    """The family of a Hugging Face directory, from its config.json `model_type`."""
    return family_of(_read_json(Path(path) / "config.json"))


def load(path: str | Path | None = None, dtype: str | None = None, layout: str = "auto", mesh=None) -> Model:
    """Load an ep_jax checkpoint, or a Hugging Face directory of a supported family (converted in
    memory); without a path, the model shipped with ep_jax. The model's preset (its own
    `preset.json` / `ep_preset.json`, else a `models/*.json` whose `match` fits) is attached:
    generation then uses its chat template and pruning defaults, as the CLI does.
    `layout`: how the decoder weights sit in memory (`LAYOUTS`; the default suits the backend).
    `mesh`: a `jax.sharding.Mesh` or "data=2,model=4" (`runtime.sharding`): an ep_jax checkpoint
    is restored straight into each device's share (no unsharded copy of the model), a Hugging
    Face directory is read on the host and then placed."""
    from ep_jax import presets

    if path is None:
        path = presets.default_model_path()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(2, "model path does not exist", str(path))
    if layout not in LAYOUTS:  # before anything heavy is read
        raise InputError(f"layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if mesh is not None:
        from ep_jax.runtime.sharding import make_mesh

        mesh = make_mesh(mesh)
    if is_ep_dir(path):
        version, family, cfg, saved = _read_ep_config(path)
        target = _dtype(dtype, saved)
        graphdef, abstract = abstract_model(family, cfg, saved)
        params = _restore(path / "params", nnx.to_pure_dict(abstract), version=version, where=path, mesh=mesh)
        if target != saved:
            params = jax.tree.map(lambda a: a.astype(target), params)
        model = from_params(family, cfg, params, target, path, layout, mesh)
    elif is_hf_dir(path):
        cfg, params = read_hf(path, dtype)
        model = from_params(hf_family(path), cfg, params, _dtype(dtype, jnp.float32), path, layout, mesh)
    else:
        raise hf.CheckpointError(
            f"{path} is neither an ep_jax checkpoint (ep_config.json + params/) nor a Hugging Face "
            "directory (config.json + *.safetensors)"
        )
    model.preset = presets.for_model(path, model.config, model.family)
    return model


def _read_ep_config(path: Path) -> tuple[int, Any, Any, Any]:
    """(format version, family, config, saved dtype) of an ep_jax checkpoint's ep_config.json;
    ConfigError naming the field for anything malformed."""
    f = path / "ep_config.json"
    fix = "convert the model again (python convert/hf_to_ep.py)"
    meta = _read_json(f)
    version = meta.get("format_version")
    if version not in READ_FORMATS:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        raise ConfigError(
            f"{path} has checkpoint format {version!r}; this ep_jax reads formats "
            f"{', '.join(map(str, READ_FORMATS))}" + (" (it was written by a newer ep_jax)" if newer else ""),
            fix="upgrade ep_jax" if newer else fix)
    for key in ("dtype", "config"):
        if key not in meta:
            raise ConfigError(f"{f}: field {key!r} is missing", fix=fix)
    if meta["dtype"] not in DTYPES:
        raise ConfigError(f"{f}: field 'dtype' is {meta['dtype']!r}, expected one of {sorted(DTYPES)}", fix=fix)
    family = get_family(meta.get("family", "llava"))
    try:
        cfg = family.config_from_json_dict(meta["config"])
    except EpJaxError:
        raise
    except KeyError as e:
        raise ConfigError(f"{f}: field 'config.{e.args[0]}' is missing", fix=fix) from None
    except (AttributeError, TypeError, ValueError) as e:
        raise ConfigError(f"{f}: field 'config' is malformed ({type(e).__name__}: {e})", fix=fix) from None
    return version, family, cfg, DTYPES[meta["dtype"]]


def _leaf_paths(tree: dict, prefix: tuple[str, ...] = ()):
    """Key paths of every leaf, e.g. ("layers", "attn", "q"); saved as "layers.attn.q"."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaf_paths(value, (*prefix, key))
        else:
            yield (*prefix, key)


# ------------------------------------------------------------------------------ parameters
_UNREADABLE_FIX = "convert again"
_SUMS_KEY = "ep_jax_sums"  # orbax custom metadata: {"layers.attn.q": float64 sum, ...}
# Saved and recomputed float64 sums of a parameter may differ by rounding (another numpy
# summation order); damage changes them by far more.
_SUM_RTOL = 1e-6
# Small models restore every parameter at once; larger ones one largest parameter at a time.
_RESTORE_MIN_BYTES = 64 << 20


def _unreadable(where, names: str = "", detail: str = "") -> CheckpointError:
    what = f"parameter(s) {names} of checkpoint {where}" if names else f"parameter(s) of checkpoint {where}"
    detail = f" ({detail})" if detail else ""
    return CheckpointError(f"{what} cannot be read: the files are truncated or corrupt{detail}", fix=_UNREADABLE_FIX)


def _short_error(e: BaseException, n: int = 200) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _restore(path: Path, abstract: dict, version: int = FORMAT_VERSION, where: Path | None = None,
             mesh=None) -> dict:
    """The parameters under params/ as jax arrays on the default device (with a `mesh`: each
    restored straight into its shards by `runtime.sharding`'s rules, every device reading only
    its own slice), each checked for NaN/inf and (format 3) against the sum saved with it:
    damage gives one CheckpointError.

    Format 3 is one orbax restore of the whole tree (the shipped model: ~0.05 s instead of
    ~0.4 s for format 2's one restore per parameter). On CPU the check reads the restored
    arrays in place (numpy views, no copy)."""
    import orbax.checkpoint as ocp

    where = where if where is not None else path.parent
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {where} has no params/ folder", fix=_UNREADABLE_FIX)
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, abstract)
    else:
        from ep_jax.runtime.sharding import param_shardings

        shardings = param_shardings(abstract, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    sums: dict = {}
    try:
        if version == 2:
            params = _restore_v2(path, target, where)
        else:
            # Bound the bytes read at once: each parameter in flight costs orbax a read buffer
            # and the array it is copied into. Unbounded, it reads everything at once (measured,
            # 8 x 128 MiB: +1.5-1.7x the model at peak); one largest parameter at a time costs
            # +2 x that parameter (+1.25x there; llava-1.5-7b bf16: 14.1 + 2 x 2.9 GB).
            largest = max(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(target))
            budget = max(largest + 1, _RESTORE_MIN_BYTES)
            with interrupts_after(), _abandoned_reads_quiet(), \
                    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(restore_concurrent_gb=budget / 1e9)) as ckpt:
                params = ckpt.restore(path.absolute(), args=ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
            sums = _saved_sums(path)
    except (EpJaxError, MemoryError):
        raise
    except Exception as e:  # orbax / tensorstore raise many types for damaged files
        raise _unreadable(where, _names_in(e, abstract)) from None
    damaged = []
    for keys in _leaf_paths(abstract):
        name = ".".join(keys)
        try:
            leaf = hf._get(params, keys)
        except (KeyError, TypeError):
            raise _unreadable(where, name, "missing from params/") from None
        if tuple(leaf.shape) != tuple(hf._get(abstract, keys).shape):
            raise _unreadable(where, name, f"shape {tuple(leaf.shape)}")
        want = sums.get(name) if jax.process_count() == 1 else None  # several hosts: each sees its part
        if want is None:  # format 2: no saved sums; NaN/inf named as such
            for piece in _pieces(leaf):
                hf.check_finite(piece, name, where)
            continue
        # saving refuses NaN/inf, so a non-finite or different sum means damaged files
        with np.errstate(all="ignore"):  # damaged values may be inf - inf
            # CPU: views of the arrays (of each device's piece on a mesh), no copy
            total = float(sum(np.sum(p, dtype=np.float64) for p in _pieces(leaf)))
        if not abs(total - want) <= _SUM_RTOL * max(1.0, abs(want)):
            damaged.append(name)
    if damaged:
        raise _unreadable(where, hf._short(damaged), "their values differ from the ones saved")
    return params


def _pieces(leaf) -> list[np.ndarray]:
    """The values of a restored parameter as host arrays: the array itself on one device, else
    each distinct addressable piece once (no gathered copy of a sharded parameter)."""
    if len(leaf.sharding.device_set) == 1:
        return [np.asarray(leaf)]
    return [np.asarray(s.data) for s in leaf.addressable_shards if s.replica_id == 0]


@contextlib.contextmanager
def _abandoned_reads_quiet():
    """Around an orbax restore. When it fails, its abandoned reads end later, in tensorstore's
    threads: they report "Event loop is closed" and their own read errors through
    sys.unraisablehook (pages of tracebacks, possibly before or after the CheckpointError is
    printed), asyncio logs their futures ("exception was never retrieved") and Python warns at
    exit that their coroutines were "never awaited". Those kinds are dropped from the start of
    the block (the first can come while orbax is still closing) and, if the block fails, from
    then on; anything else still reaches the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_ep_jax_quiet", False):
        yield
        return

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        closed_loop = isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(
            unraisable.exc_value)
        interrupt = isinstance(unraisable.exc_value, KeyboardInterrupt)  # a Ctrl-C: never dropped here
        if not interrupt and (closed_loop or (code is not None and "orbax" in code.co_filename)):
            return
        previous(unraisable)

    hook._ep_jax_quiet = True
    sys.unraisablehook = hook
    asyncio_log = logging.getLogger("asyncio")
    never_retrieved = _DropMessages("exception was never retrieved")
    asyncio_log.addFilter(never_retrieved)
    try:
        yield
    except BaseException:
        warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
        raise
    asyncio_log.removeFilter(never_retrieved)
    if sys.unraisablehook is hook:
        sys.unraisablehook = previous


class _DropMessages(logging.Filter):
    """Drops the log records whose message contains `text`."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _names_in(e: BaseException, abstract: dict) -> str:
    """The parameters an orbax/tensorstore error names (it quotes their paths, "NAME/")."""
    text = str(e)
    names = [".".join(k) for k in _leaf_paths(abstract)]
    return hf._short([n for n in names if f"'{n}/" in text or f'"{n}/' in text])


def _restore_v2(path: Path, target: dict, where) -> dict:
    """Format 2: one orbax checkpoint per parameter, params/NAME."""
    import orbax.checkpoint as ocp

    params: dict = {}
    missing = [".".join(k) for k in _leaf_paths(target) if not (path / ".".join(k)).is_dir()]
    if missing:
        raise _unreadable(where, hf._short(missing), "missing from params/")
    with interrupts_after(), _abandoned_reads_quiet(), ocp.StandardCheckpointer() as ckpt:
        for keys in _leaf_paths(target):
            name = ".".join(keys)
            try:
                value = ckpt.restore((path / name).absolute(), {"value": hf._get(target, keys)})["value"]
            except MemoryError:
                raise
            except Exception:  # orbax / tensorstore raise many types for damaged files
                raise _unreadable(where, name) from None
            hf._set(params, keys, value)
    return params


def _saved_sums(path: Path) -> dict:
    """The per-parameter sums saved as orbax custom metadata ({} when absent)."""
    try:
        meta = json.loads((path / "_METADATA").read_text(encoding="utf-8"))
        sums = (meta.get("custom_metadata") or {}).get(_SUMS_KEY) or {}
    except (OSError, ValueError, AttributeError):
        raise _unreadable(path.parent, detail="params/_METADATA is damaged") from None
    if not isinstance(sums, dict):
        raise _unreadable(path.parent, detail="params/_METADATA: malformed sums")
    return sums


def _save_params(params: dict, path: Path, consume: bool = False, where: str | Path | None = None) -> None:
    """params/ as ONE orbax checkpoint of the nested dict (format 3), the float64 sum of each
    parameter in its custom metadata; a parameter holding NaN/inf is refused (CheckpointError).

    Memory: leaves are written as numpy arrays (views of CPU jax arrays: no copy), without
    orbax's defensive copy of host arrays and without zstd compression, whose buffers for a
    whole tree written at once cost about one more model (measured on the 160 MiB probe model:
    +96% of the model with orbax's default numpy handler, +91% for jax arrays, +1% here). That
    keeps converting llava-1.5-7b within 24 GiB. `consume`: the leaves are dropped from
    `params` once written."""
    import orbax.checkpoint as ocp

    where = where if where is not None else path.parent
    tree: dict = {}
    sums: dict = {}
    for keys in list(_leaf_paths(params)):
        name = ".".join(keys)
        arr = np.asarray(hf._get(params, keys))  # a view for numpy / CPU arrays, a host copy of device ones
        sums[name] = hf.check_finite(arr, name, where)
        hf._set(tree, keys, arr)
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),
    )
    handler = ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)
    try:
        with interrupts_after(), ocp.Checkpointer(handler) as ckpt:
            ckpt.save(path.absolute(), args=ocp.args.PyTreeSave(tree, custom_metadata={_SUMS_KEY: sums}))
    except (OSError, ValueError, RuntimeError) as e:  # tensorstore reports a full disk as a ValueError
        if isinstance(e, EpJaxError):
            raise
        raise OutputPathError(f"cannot write the parameters of {where}: {_short_error(e, 300)}",
                              fix="check the free disk space") from e
    del tree
    if consume:
        for keys in list(_leaf_paths(params)):
            hf._set(params, keys, None)


def _write_checkpoint(out: Path, cfg, params: dict, *, src=None, hf_config: dict | None = None,
                      consume: bool = False, where=None, family: str | None = None) -> None:
    """The files of an ep_jax checkpoint, into the (empty, temporary) folder `out`."""
    dtype = str(jax.tree.leaves(params)[0].dtype)
    _save_params(params, out / "params", consume=consume, where=where)
    meta = {"format_version": FORMAT_VERSION, "dtype": dtype, "config": cfg.to_json_dict()}
    if family is not None:
        meta["family"] = family
    (out / "ep_config.json").write_text(json.dumps(meta, indent=1))
    (out / "config.json").write_text(json.dumps(hf_config or cfg.to_hf_dict(), indent=1))
    if src is not None:
        copy_side_files(src, out)


def save(cfg, params: dict, dst: str | Path, *, src: str | Path | None = None,
         hf_config: dict | None = None, consume: bool = False, overwrite: bool = False,
         keep: tuple[str, ...] = (), family: str | None = None) -> Path:
    """Write an ep_jax checkpoint; tokenizer/processor files are copied from `src` (which may be
    `dst` itself: they are copied before the old folder goes).

    The checkpoint is built in a temporary folder beside `dst` and renamed into place once
    complete. An existing non-empty `dst` is refused (OutputPathError) unless `overwrite`; then
    it is replaced as a whole, keeping only the files named in `keep` (e.g. "preset.json").
    `consume=True` empties `params` while saving (conversion of large models); `family` is
    recorded in ep_config.json (absent: "llava")."""
    dst = Path(dst)
    with staged_folder(dst, overwrite, sources=(src,), keep=keep) as tmp:
        _write_checkpoint(tmp, cfg, params, src=src, hf_config=hf_config, consume=consume, where=dst, family=family)
    return dst


def copy_side_files(src: str | Path, dst: str | Path) -> None:
    """Copy the tokenizer/processor files (`_SIDE_FILES`) that `src` has into `dst`."""
    for name in _SIDE_FILES:
        f = Path(src) / name
        if f.is_file() and f.resolve() != (Path(dst) / name).resolve():
            shutil.copyfile(f, Path(dst) / name)


def convert_hf(src: str | Path, dst: str | Path, dtype: str = "float32", progress: bool = True,
               overwrite: bool = False) -> Path:
    """Hugging Face directory -> ep_jax checkpoint, streaming tensors shard by shard.

    `dst` is checked before any tensor is read, and written through a temporary folder beside it
    (see `save`): Ctrl-C or a full disk leaves it as it was."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"source {src} is not a directory", fix="give a Hugging Face LLaVA directory")
    _dtype(dtype, None)  # InputError for an unknown dtype, before anything is written
    with staged_folder(dst, overwrite, sources=(src,)) as tmp:
        cfg, params = read_hf(src, dtype, progress=progress)
        hf_config = _read_json(src / "config.json")
        if progress:
            print(f"  writing {dst}", file=sys.stderr, flush=True)
        _write_checkpoint(tmp, cfg, params, src=src, hf_config=hf_config, consume=True, where=dst,
                          family=hf_family(src).name)
    return dst


def export_hf(model_or_path, dst: str | Path, max_shard_bytes: int = 2 << 30, overwrite: bool = False) -> Path:
    """ep_jax checkpoint -> HF directory in the hub layout that transformers loads; written
    through a temporary folder beside `dst` (see `save`), which is checked before loading."""
    from safetensors.numpy import save_file

    dst = Path(dst)
    source = model_or_path.path if isinstance(model_or_path, Model) else Path(model_or_path)
    with staged_folder(dst, overwrite, sources=(source,)) as tmp:
        model = model_or_path if isinstance(model_or_path, Model) else load(model_or_path)
        params = jax.tree.map(np.asarray, model.params())
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        for name, arr in model.family.iter_hf_export(params, model.config):
            if size + arr.nbytes > max_shard_bytes and shards[-1]:
                shards.append({})
                size = 0
            shards[-1][name] = arr
            size += arr.nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        index = {"metadata": {"total_size": sum(a.nbytes for s in shards for a in s.values())},
                 "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        hf_config = model.config.to_hf_dict()
        if model.path is not None and (model.path / "config.json").is_file():
            hf_config = _read_json(model.path / "config.json")
        hf_config["torch_dtype"] = str(model.dtype)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=1))
        if model.path is not None:
            copy_side_files(model.path, tmp)
    return dst
