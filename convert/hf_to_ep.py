"""Convert a local Hugging Face LLaVA directory to an ep_jax checkpoint.

    python convert/hf_to_ep.py SRC DST [--dtype float32|bfloat16] [--overwrite]

SRC holds config.json, *.safetensors (sharded with an index, or single), the tokenizer and the
processor files. Tensors are streamed shard by shard into the converted (stacked) layout, so
the peak memory is about the converted model plus one tensor (see README). DST is written
through a temporary folder beside it and renamed into place when complete: an existing DST is
refused unless --overwrite, and Ctrl-C or an error leaves it as it was.
"""

import argparse
import sys
import time

from ep_jax.cli import run_cli


def _peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="Hugging Face LLaVA directory")
    p.add_argument("dst", help="output ep_jax checkpoint directory")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing DST (the old one is removed only once the new one is complete)")
    return run_cli(p, _run, argv)  # errors: exit 2 and one line; bugs: the traceback


def _run(args) -> int:
    from ep_jax.checkpoint import convert_hf

    t0 = time.perf_counter()
    try:
        out = convert_hf(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print(f"interrupted: {args.dst} was left as it was", file=sys.stderr)
        return 130
    peak_mib = _peak_rss_mib()
    print(f"wrote {out} ({args.dtype}) in {time.perf_counter() - t0:.1f}s, peak RSS {peak_mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
