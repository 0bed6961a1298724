"""Model families (one sub-package each) and their registry (`base.py`)."""

from ep_jax.families.base import FAMILIES, Family, family_of, get, register

__all__ = ["FAMILIES", "Family", "family_of", "get", "register"]
