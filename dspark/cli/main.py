"""The `dspark` command line: generate, init-draft, info here; the other commands come from the
modules in COMMAND_MODULES (demo, bench; calibrate, sts, simulate, conformance; regenerate, train; serve).

Each subcommand is a thin layer over the public API (`dspark.Engine`,
`dspark.init_draft`, `dspark.backends`); engine and sampling flags are generated from the
dataclasses the API uses (`EngineConfig`, `SamplingParams`; see `args`), so the CLI and the
library cannot drift apart.

Output contract: results go to stdout (plain text, or one JSON document with --json); progress
and statistics go to stderr. Bad input (a missing directory, an unknown backend, a malformed
prompt, an output path that cannot be written) prints `dspark: error: <message>` and exits with
status 2; anything else is a bug and keeps its traceback. A closed stdout is an error before any
work; a reader that goes away (`dspark generate --stream | head`) ends the command quietly with
status 141, as a Unix tool killed by SIGPIPE; a full disk behind stdout is one line, status 2.
Ctrl-C prints one line, status 130.
"""
import argparse
import errno
import importlib
import io
import json
import os
import platform
import sys
import textwrap
import time
from dataclasses import replace
from typing import Optional, Sequence

from .. import __version__
from ..backends import BACKENDS, ENV_VAR, BackendUnavailableError, get_backend
from ..engine import Engine
from ..errors import ConfigError, DSparkError
from ..models import DRAFT_ALGORITHMS, init_draft
from ..models.drafts.heads import MARKOV_HEADS
from ..params import SamplingParams
from ..prompts import prompt_ids, read_prompts
from .args import (add_backend, add_engine_flags, add_sampling_flags, engine_config, int_list, non_negative_int,
                   positive_int, progress, sampling_overrides)

# Modules of dspark.cli that add subcommands: each has add_commands(commands, formatter, para).
COMMAND_MODULES = ("bench", "scheduling", "training", "serve", "export")
# The error net: dspark's own errors (bad settings, data, checkpoints, an unavailable backend)
# and missing files are the user's to fix, reported in one line with exit status 2. Any other
# exception is a bug in dspark and keeps its traceback.
USER_ERRORS = (DSparkError, FileNotFoundError)
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141          # 128 + SIGPIPE: what a shell reports for a tool whose reader left


def _para(text: str) -> str:
    """Wrap a help description (the raw formatter keeps the epilog's example lines as written)."""
    return textwrap.fill(text, width=79)


# ----------------------------------------------------------------------------- prompts
# Prompts from --prompt, --prompt-ids and --prompts-file share one list, so they keep
# their command-line order; each entry is tagged with where it came from.
def _text_prompt(text: str) -> tuple:
    return ("text", text)


def _ids_prompt(text: str) -> tuple:
    return ("ids", int_list(text))


def _file_prompt(path: str) -> tuple:
    return ("file", path)


def _collect_prompts(entries: Optional[list]) -> list:
    """The tagged entries in order -> [("text", str) | ("ids", [int]) | ("chat", [message])];
    files are read by `dspark.prompts.read_prompts` (errors name the file and line)."""
    prompts = []
    for kind, value in entries or []:
        if kind != "file":
            prompts.append((kind, value))
            continue
        for record in read_prompts(value):
            if "prompt_ids" in record:
                prompts.append(("ids", record["prompt_ids"]))
            elif "messages" in record:
                prompts.append(("chat", record["messages"]))
            else:
                prompts.append(("text", record["prompt"]))
    if not prompts:
        raise ConfigError("no prompts given; use --prompt TEXT, --prompt-ids 1,2,3 or --prompts-file FILE.jsonl")
    return prompts


def _apply_chat(tokenizer, prompts: list) -> list:
    """Wrap text prompts in the tokenizer's chat template (one user turn), returning token ids."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        progress("note: --chat ignored: the target has no tokenizer with a chat template")
        return prompts
    wrapped = []
    for kind, value in prompts:
        if kind == "text":
            wrapped.append(("ids", prompt_ids({"prompt": value}, tokenizer)))
        else:
            wrapped.append((kind, value))
    return wrapped


# ----------------------------------------------------------------------------- generate
def _cmd_generate(args) -> int:
    # Validate every option before loading anything, so a typo fails in milliseconds.
    config = engine_config(args)
    overrides = sampling_overrides(args)
    prompts = _collect_prompts(args.prompts)
    backend = get_backend(args.backend)

    started = time.perf_counter()
    progress(f"loading target {args.target} (backend {backend.name}, device {backend.device}) ...")
    if args.draft is not None:
        progress(f"loading draft {args.draft} ...")
    engine = Engine.from_pretrained(args.target, draft=args.draft, backend=backend, **config.to_dict())
    progress(f"ready in {time.perf_counter() - started:.1f} s: dtype {str(engine.dtype).replace('torch.', '')}, "
             f"gamma {engine.gamma}" + ("" if args.draft else " (no draft: plain target decoding)"))
    # Flags the user left out fall back to the target's generation_config.json.
    params = replace(engine.default_sampling_params(), **overrides)

    if args.chat:
        prompts = _apply_chat(engine.tokenizer, prompts)
    inputs = [value for _, value in prompts]
    if args.stream:
        return _stream(engine, inputs, params)

    started = time.perf_counter()
    outputs = engine.generate(inputs, params)
    elapsed = time.perf_counter() - started
    total = sum(len(o.token_ids) for o in outputs)
    if args.json:
        document = {
            "backend": backend.name,
            "outputs": [{"index": o.index, "token_ids": o.token_ids, "text": o.text,
                         "finish_reason": o.finish_reason, "stats": o.stats,
                         **({"error": o.error} if o.error else {})} for o in outputs],
            "elapsed_s": elapsed,
        }
        print(json.dumps(document))
        return 0
    for o in outputs:
        if len(outputs) > 1:
            print(f"--- output {o.index} ---")
        print(o.text if o.text is not None else " ".join(map(str, o.token_ids)))
    for o in outputs:
        tau = o.stats.get("tau")
        tau_text = f"{tau:.2f}" if tau is not None else "-"
        progress(f"[{o.index}] {len(o.token_ids)} tokens, {o.stats.get('rounds', 0)} rounds, tau {tau_text}, "
                 f"finish {o.finish_reason}" + (f" ({o.error})" if o.error else ""))
    progress(f"total: {total} tokens in {elapsed:.2f} s ({total / max(elapsed, 1e-9):.1f} tokens/s)")
    return 0


def _stream(engine: Engine, inputs: list, params: SamplingParams) -> int:
    """Print pieces as they are accepted. One prompt: raw text. Several: lines prefixed '[i] '."""
    single = len(inputs) == 1
    pending = {}                      # index -> text not yet ended by a newline (several prompts)
    counts, reasons = {}, {}
    started = time.perf_counter()
    out = sys.stdout
    for event in engine.stream(inputs, params):
        counts[event.index] = counts.get(event.index, 0) + len(event.token_ids)
        if event.finished:
            reasons[event.index] = event.finish_reason
        if event.text is None:        # no tokenizer: token ids
            piece = " ".join(map(str, event.token_ids))
            if single:
                out.write(piece + ("\n" if event.finished else " "))
            elif piece:
                out.write(f"[{event.index}] {piece}\n")
        elif single:
            out.write(event.text + ("\n" if event.finished else ""))
        else:
            buffer = pending.get(event.index, "") + event.text
            *lines, buffer = buffer.split("\n")
            for line in lines:
                out.write(f"[{event.index}] {line}\n")
            if event.finished and buffer:
                out.write(f"[{event.index}] {buffer}\n")
                buffer = ""
            pending[event.index] = buffer
        out.flush()
    elapsed = time.perf_counter() - started
    for index in sorted(counts):
        progress(f"[{index}] {counts[index]} tokens, finish {reasons.get(index, 'length')}")
    total = sum(counts.values())
    progress(f"total: {total} tokens in {elapsed:.2f} s ({total / max(elapsed, 1e-9):.1f} tokens/s)")
    return 0


# ----------------------------------------------------------------------------- init-draft
INIT_FLAGS = ("num_layers", "block_size", "markov_rank", "markov_head_type", "mask_token_id", "target_layer_ids",
              "seed", "from_target")


def _cmd_init_draft(args) -> int:
    options = {name: getattr(args, name) for name in INIT_FLAGS if getattr(args, name) is not None}
    # init_draft checks --out (not the target, a writable directory) before it loads anything.
    path = init_draft(args.target, args.out, algorithm=args.algorithm, progress=progress, **options)
    if args.json:
        print(json.dumps({"draft": str(path), "algorithm": args.algorithm}))
    else:
        progress(f"wrote an untrained {args.algorithm} draft:")
        print(path)
    return 0


# ----------------------------------------------------------------------------- info
def _backend_report() -> tuple[dict, dict]:
    backends = {}
    for name, cls in BACKENDS.items():
        reason = cls.unavailable_reason()
        entry = {"available": reason is None}
        if reason is None:
            try:
                entry["describe"] = get_backend(name).describe()
            except BackendUnavailableError as exc:   # detected, but construction failed
                entry.update(available=False, reason=str(exc))
        else:
            entry["reason"] = reason
        backends[name] = entry
    selection = {"env": ENV_VAR, "value": os.environ.get(ENV_VAR)}
    try:
        selection["resolves_to"] = get_backend(None).name
    except DSparkError as exc:
        selection["resolves_to"], selection["error"] = None, str(exc)
    return backends, selection


def _cmd_info(args) -> int:
    import torch
    import transformers

    backends, selection = _backend_report()
    report = {
        "dspark": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "backends": backends,
        "selected_backend": selection,
        "draft_algorithms": {name: algo.description for name, algo in DRAFT_ALGORITHMS.items()},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"dspark {report['dspark']}  (python {report['python']}, torch {report['torch']}, "
          f"transformers {report['transformers']})")
    print("backends:")
    for name, entry in backends.items():
        if entry["available"]:
            details = ", ".join(f"{k}={v}" for k, v in entry["describe"].items() if k != "name")
            print(f"  {name:<7} available    {details}")
        else:
            print(f"  {name:<7} unavailable  {entry['reason']}")
    value = selection["value"]
    source = f"${ENV_VAR}={value}" if value is not None else f"${ENV_VAR} unset (auto)"
    resolved = selection["resolves_to"] or f"error: {selection['error']}"
    print(f"selected: {source} -> {resolved}")
    print("draft algorithms:")
    for name, description in report["draft_algorithms"].items():
        print(f"  {name:<7} {description}")
    return 0


# ----------------------------------------------------------------------------- the parser
def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="dspark", formatter_class=formatter,
        description=_para("Lossless DSpark speculative decoding for Hugging Face Qwen3 / Llama checkpoints "
                          "on CPU, CUDA and Ascend."),
        epilog="examples:\n"
               "  dspark info\n"
               "  dspark init-draft --target ./Qwen3-0.6B --out ./draft\n"
               "  dspark generate --target ./Qwen3-0.6B --draft ./draft --prompt 'Hello' --chat\n\n"
               f"The backend comes from --backend, else ${ENV_VAR} (cpu | cuda | ascend | auto; default auto).")
    parser.add_argument("--version", action="version", version=f"dspark {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    # --- generate
    gen = commands.add_parser(
        "generate", formatter_class=formatter, help="generate text with a target and an optional draft",
        description=_para("Generate continuations of one or more prompts. With --draft the target verifies the "
                          "draft's proposals (lossless: greedy output is identical to the target alone); without "
                          "it, plain target decoding. Prompts from --prompt, --prompt-ids and --prompts-file are "
                          "batched together, in command-line order. Every engine option and sampling parameter "
                          "of the Python API has a flag; sampling flags left out follow the target's "
                          "generation_config.json."),
        epilog="examples:\n"
               "  dspark generate --target ./Qwen3-0.6B --draft ./draft --prompt 'Why is the sky blue?' --chat\n"
               "  dspark generate --target ./tiny --prompt-ids 1,2,3 --max-new-tokens 16 --ignore-eos --json\n"
               "  dspark generate --target ./Qwen3-0.6B --prompts-file mt_bench.jsonl --temperature 1 --seed 0")
    gen.add_argument("--target", required=True, metavar="DIR", help="target model directory (HF format)")
    gen.add_argument("--draft", metavar="DIR", help="draft directory (DeepSpec / dspark format); omit for "
                                                    "plain target decoding")
    add_backend(gen)
    group = gen.add_argument_group("prompts (repeatable, combined in order)")
    group.add_argument("--prompt", dest="prompts", action="append", type=_text_prompt, metavar="TEXT",
                       help="a text prompt (needs a tokenizer in the target directory)")
    group.add_argument("--prompt-ids", dest="prompts", action="append", type=_ids_prompt, metavar="IDS",
                       help="a prompt as comma-separated token ids, e.g. 1,2,3")
    group.add_argument("--prompts-file", dest="prompts", action="append", type=_file_prompt,
                       metavar="FILE.jsonl", help='JSON lines: {"turns": [str, ...]} (first turn), {"prompt": str}, '
                                                  '{"question": str}, {"messages": [...]} or {"prompt_ids": [int]}')
    group.add_argument("--chat", action="store_true",
                       help="wrap text prompts in the tokenizer's chat template (add_generation_prompt=True)")
    add_sampling_flags(gen.add_argument_group("sampling (dspark.SamplingParams)"))
    add_engine_flags(gen.add_argument_group("engine (dspark.EngineConfig)"))
    output = gen.add_argument_group("output").add_mutually_exclusive_group()
    output.add_argument("--stream", action="store_true", help="print text as it is accepted")
    output.add_argument("--json", action="store_true", help="print one JSON document with ids, text and stats")
    gen.set_defaults(run=_cmd_generate)

    # --- init-draft
    init = commands.add_parser(
        "init-draft", formatter_class=formatter, help="create an untrained draft sized for a target",
        description=_para("Create an untrained draft directory (config.json + model.safetensors, DeepSpec layout) "
                          "shaped for a target: embedding and LM head copied from the target, other weights random. "
                          "Options left out take the algorithm's defaults or follow the target. An existing draft "
                          "in --out is replaced; --out may not be the target or hold another model."),
        epilog="example:\n  dspark init-draft --target ./Qwen3-0.6B --out ./draft --num-layers 2 --block-size 7")
    init.add_argument("--target", required=True, metavar="DIR", help="target model directory (HF format)")
    init.add_argument("--out", required=True, metavar="DIR", help="where to write the draft")
    init.add_argument("--algorithm", choices=list(DRAFT_ALGORITHMS), default="dspark",
                      help="draft algorithm (default: %(default)s)")
    init.add_argument("--num-layers", type=positive_int, metavar="N", help="draft decoder layers")
    init.add_argument("--block-size", type=positive_int, metavar="N", help="tokens drafted per round (gamma)")
    init.add_argument("--markov-rank", type=non_negative_int, metavar="R",
                      help="rank of the Markov transition (dspark; 0 = none)")
    init.add_argument("--markov-head-type", choices=list(MARKOV_HEADS), help="Markov head variant (dspark)")
    init.add_argument("--mask-token-id", type=non_negative_int, metavar="ID",
                      help="token id used for mask slots (default: the last vocabulary id)")
    init.add_argument("--target-layer-ids", type=int_list, metavar="IDS",
                      help="target layers whose hidden states feed the draft, e.g. 1,9,17")
    init.add_argument("--seed", type=int, metavar="S", help="seed for the random weights")
    init.add_argument("--from-target", action="store_true", default=None,
                      help="warm start: the layers take the target's last layer where shapes match, the final "
                           "norm the target's, and the feature fusion starts as the identity on the deepest "
                           "layer (trains faster on small budgets)")
    init.add_argument("--json", action="store_true", help='print {"draft": path, "algorithm": name}')
    init.set_defaults(run=_cmd_init_draft)

    # --- info
    info = commands.add_parser(
        "info", formatter_class=formatter, help="versions, backends and draft algorithms",
        description=_para(f"Show versions, which backends can run here (and why not), which one ${ENV_VAR} / auto "
                          "selects, and the registered draft algorithms."),
        epilog="example:\n  DSPARK_BACKEND=cuda dspark info --json")
    info.add_argument("--json", action="store_true", help="print one JSON document")
    info.set_defaults(run=_cmd_info)

    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").add_commands(commands, formatter, _para)
    return parser


class OutputClosed(Exception):
    """Standard output could not be written (the reader left, the disk behind it is full)."""


class _GuardedStdout(io.TextIOBase):
    """sys.stdout during a command: a failed write or flush raises OutputClosed, which the
    error net tells apart from an OSError of the command's own files."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as exc:
            raise OutputClosed(exc) from exc

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as exc:
            raise OutputClosed(exc) from exc

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


def _discard_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so the interpreter's final flush of what is still
    buffered cannot fail again and print 'Exception ignored ...' (Python's documented recipe)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.__stdout__.fileno())
    except (OSError, AttributeError, ValueError):      # no real descriptor (tests capture stdout)
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    if sys.stderr is None:           # stderr closed: progress lines must not fall through to stdout
        sys.stderr = open(os.devnull, "w")
    if sys.stdout is None:           # `dspark ... >&-`: the results would vanish without a word
        print("dspark: error: standard output is closed; redirect it to a file (or to /dev/null to "
              "discard the results)", file=sys.stderr)
        return EXIT_USAGE
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:        # --help, --version, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    args.argv = list(sys.argv[1:] if argv is None else argv)    # for reports that record their command
    stdout, sys.stdout = sys.stdout, _GuardedStdout(sys.stdout)
    try:
        code = args.run(args)
        sys.stdout.flush()
        return code
    except USER_ERRORS as exc:
        print(f"dspark: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dspark: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OutputClosed as exc:
        _discard_stdout()
        cause = exc.__cause__
        if isinstance(cause, BrokenPipeError) or getattr(cause, "errno", None) == errno.EPIPE:
            return EXIT_BROKEN_PIPE  # the reader has what it wanted (`| head`): nothing to report
        print(f"dspark: error: cannot write the results to standard output: {cause}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        sys.stdout = stdout


if __name__ == "__main__":
    sys.exit(main())
