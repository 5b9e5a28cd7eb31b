"""The `dspark` command line.

What lives here: `main` (the parser, the error net and `generate` / `init-draft` / `info`),
`args` (flags every command shares: backend, progress, integer lists, engine and sampling flags
generated from EngineConfig / SamplingParams), and one module per group of commands:
`bench` (demo, bench), `scheduling` (calibrate, sts, simulate, conformance) and `training`
(regenerate, train).

Who may import it: nothing but `dspark.__main__` and the console script. It imports everything,
but only once `main()` runs, inside its Ctrl-C handling (loading torch takes seconds).
"""
import os
import signal
import sys
import threading

EXIT_INTERRUPTED = 130


def _interrupted(signum, frame) -> None:
    """Ctrl-C: one line and exit now. A KeyboardInterrupt is not enough here: raised inside a
    third-party import it can be swallowed (the command then runs on) or turn into an
    ImportError traceback (seen inside torch's import of numpy), and the engine's loop thread
    would hold the exit until its round ends. Nothing is lost by stopping at once: every model,
    profile and config is written atomically, and training and regeneration resume."""
    os.write(2, b"dspark: interrupted\n")
    os._exit(EXIT_INTERRUPTED)


def main(argv=None) -> int:
    """The console script: load the command line, then run it (see dspark.cli.main.main)."""
    # Only a process's main thread may set handlers, and a handler someone else installed (or
    # an ignored SIGINT, as in a background job) is theirs to keep.
    takes_sigint = threading.current_thread() is threading.main_thread() \
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if takes_sigint:
        signal.signal(signal.SIGINT, _interrupted)
    try:
        from .main import main as run
        return run(argv)
    except KeyboardInterrupt:        # SIGINT left to a caller's handler that raises
        print("dspark: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        # Importing the submodule dspark.cli.main rebinds this package's `main` to that module.
        globals()["main"] = _entry
        if takes_sigint:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def build_parser():
    from .main import build_parser as build

    globals()["main"] = _entry
    return build()


_entry = main

__all__ = ["build_parser", "main"]
