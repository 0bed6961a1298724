"""`python -m ep_jax.ecl`: the command line (`ep_jax/cli/ecl.py`); the measurement itself is
`ep_jax/analysis/ecl.py`."""

import sys

if __name__ == "__main__":
    from ep_jax.cli.ecl import main

    sys.exit(main())
