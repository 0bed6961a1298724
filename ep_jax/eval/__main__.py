"""`python -m ep_jax.eval vqa ...` (see `ep_jax/eval/vqa.py`)."""

import sys

from ep_jax.eval.vqa import main

if __name__ == "__main__":
    sys.exit(main())
