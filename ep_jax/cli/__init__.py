"""Command-line entry points (`python -m ep_jax.generate`, `python -m ep_jax.ecl`, ...) and the
one error model they share.

Exit status: 0 done; 2 a problem the user can fix (an `EpJaxError`, a file that cannot be read
or written), one `error:` line; 130 interrupted (Ctrl-C), one line; 1 a bug: the traceback,
then a line saying so. `--debug` (or EP_JAX_DEBUG=1) shows the traceback for every error.
"""

from __future__ import annotations

import _thread
import argparse
import os
import sys
import threading
import traceback

from ep_jax.errors import EpJaxError

BUG_LINE = ("ep_jax: this is a bug in ep_jax, not in your input (the traceback above says where); "
            "please report it with the command you ran")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error")


def add_mesh_argument(parser: argparse.ArgumentParser) -> None:
    """The `--mesh` flag of the CLIs and benchmarks (read by `runtime.sharding.mesh_from_flag`)."""
    parser.add_argument("--mesh", default=None, metavar="data=D,model=M",
                        help="run on several devices: D-way data parallel x M-way tensor parallel "
                             "(D x M = all devices; several hosts: see README 'Several devices')")


def debug_enabled(args=None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("EP_JAX_DEBUG", "") not in ("", "0")


def describe_os_error(e: OSError) -> str:
    where = f": {e.filename}" if getattr(e, "filename", None) else ""
    return f"{e.strerror or e}{where}" if e.strerror else f"{e}"


def redeliver_swallowed_interrupts() -> None:
    """Ctrl-C raises KeyboardInterrupt in whatever Python code runs at that moment; when that is
    a callback whose exceptions Python ignores (JAX's garbage-collection callback, a __del__),
    it would be printed as "Exception ignored" and lost. Deliver it again instead, to the main
    code, a moment later (from a timer thread, so that it arrives after the callback returned;
    swallowed again, it is delivered again)."""
    previous = sys.unraisablehook
    if getattr(previous, "_ep_jax_interrupts", False):
        return

    def hook(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            threading.Timer(0.05, _thread.interrupt_main).start()
            return
        previous(unraisable)

    hook._ep_jax_interrupts = True
    sys.unraisablehook = hook


def run_cli(parser: argparse.ArgumentParser, run, argv=None) -> int:
    """Parse, check, run; map errors to exit statuses (module docstring)."""
    if not any(a.dest == "debug" for a in parser._actions):
        add_debug_flag(parser)
    args = parser.parse_args(argv)
    debug = debug_enabled(args)
    redeliver_swallowed_interrupts()
    try:
        return run(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("interrupted", file=sys.stderr)
        return 130
    except EpJaxError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except Exception:  # a bug: show where
        traceback.print_exc()
        print(BUG_LINE, file=sys.stderr)
        return 1
