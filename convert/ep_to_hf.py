"""Export an ep_jax checkpoint to a Hugging Face LLaVA directory (hub layout).

    python convert/ep_to_hf.py SRC DST [--overwrite]

transformers loads the result with LlavaForConditionalGeneration.from_pretrained(DST). DST is
written through a temporary folder beside it and renamed into place when complete: an existing
DST is refused unless --overwrite, and Ctrl-C or an error leaves it as it was.
"""

import argparse
import sys

from ep_jax.cli import run_cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="ep_jax checkpoint directory")
    p.add_argument("dst", help="output Hugging Face directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing DST (the old one is removed only once the new one is complete)")
    return run_cli(p, _run, argv)  # errors: exit 2 and one line; bugs: the traceback


def _run(args) -> int:
    from ep_jax.checkpoint import export_hf

    try:
        out = export_hf(args.src, args.dst, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print(f"interrupted: {args.dst} was left as it was", file=sys.stderr)
        return 130
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
