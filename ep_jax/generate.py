"""`python -m ep_jax.generate`: the command line (`ep_jax/cli/generate.py`).

The function `ep_jax.generate` lives in `ep_jax/runtime/api.py`; importing this module keeps
`ep_jax.generate(...)` callable (the package attribute becomes this module, which forwards).
"""

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from ep_jax.runtime.api import generate

        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    from ep_jax.cli.generate import main

    sys.exit(main())
