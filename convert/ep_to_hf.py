"""Export an ep_jax checkpoint to a Hugging Face LLaVA directory (hub layout).

    python convert/ep_to_hf.py SRC DST

transformers loads the result with LlavaForConditionalGeneration.from_pretrained(DST).
"""

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="ep_jax checkpoint directory")
    p.add_argument("dst", help="output Hugging Face directory")
    args = p.parse_args(argv)

    from ep_jax.checkpoint import export_hf
    from ep_jax.config import ConfigError
    from ep_jax.hf import CheckpointError

    try:
        out = export_hf(args.src, args.dst)
    except (CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
