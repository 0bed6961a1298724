"""`python -m ep_jax.eval`: benchmark runners. `vqa` answers a LLaVA question file
(`ep_jax/eval/vqa.py`)."""
