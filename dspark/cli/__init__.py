"""The `dspark` command line.

What lives here: `main` (the parser, the error net and `generate` / `init-draft` / `info`),
`args` (flags every command shares: backend, progress, integer lists, engine and sampling flags
generated from EngineConfig / SamplingParams), and one module per group of commands:
`bench` (demo, bench), `scheduling` (calibrate, sts, simulate, conformance) and `training`
(regenerate, train).

Who may import it: nothing but `dspark.__main__` and the console script. It imports everything.
"""
from .main import build_parser, main

__all__ = ["build_parser", "main"]
