"""The `dspark` command line: generate, init-draft, info here; the other commands come from the
modules in COMMAND_MODULES (demo, bench; calibrate, sts, simulate, conformance; regenerate, train).

Each subcommand is a thin layer over the public API (`dspark.Engine`,
`dspark.init_draft`, `dspark.backends`); option defaults come from the same
dataclasses the API uses (`SamplingParams`, `EngineConfig`), so the CLI and
the library cannot drift apart.

Output contract: results go to stdout (plain text, or one JSON document with
--json); progress and statistics go to stderr. Bad input (a missing
directory, an unknown backend, a malformed prompt) prints
`dspark: error: <message>` and exits with status 2, never a traceback.
"""
import argparse
import importlib
import json
import os
import platform
import sys
import textwrap
import time
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Optional, Sequence

from .. import __version__
from ..backends import BACKENDS, ENV_VAR, BackendUnavailableError, get_backend
from ..engine import Engine
from ..errors import DSparkError
from ..models import DRAFT_ALGORITHMS, init_draft
from ..models.drafts.heads import MARKOV_HEADS
from ..ops import SCHEDULE_MODES
from ..params import DTYPES, EngineConfig, SamplingParams
from ..prompts import prompt_ids

# Modules of dspark.cli that add subcommands: each has add_commands(commands, formatter, para).
COMMAND_MODULES = ("bench", "scheduling", "training")
# Exceptions that mean "the user asked for something that cannot work": reported in one line, exit 2.
USER_ERRORS = (DSparkError, BackendUnavailableError, ValueError, FileNotFoundError, TypeError)
EXIT_USAGE = 2


def _default(cls, name: str):
    """A dataclass field's default, so --help shows the API's defaults."""
    for f in fields(cls):
        if f.name == name:
            return f.default if f.default is not MISSING else None
    raise KeyError(name)


def _para(text: str) -> str:
    """Wrap a help description (the raw formatter keeps the epilog's example lines as written)."""
    return textwrap.fill(text, width=79)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- argument types
def _int_list(text: str) -> list:
    """'1,2,3' -> [1, 2, 3] (spaces allowed)."""
    parts = [p for p in text.replace(" ", ",").split(",") if p]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like '1,2,3', got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


# Prompts from --prompt, --prompt-ids and --prompts-file share one list, so they keep
# their command-line order; each entry is tagged with where it came from.
def _text_prompt(text: str) -> tuple:
    return ("text", text)


def _ids_prompt(text: str) -> tuple:
    return ("ids", _int_list(text))


def _file_prompt(path: str) -> tuple:
    return ("file", path)


def _read_prompts_file(path: str) -> list:
    """JSON lines, each {"turns": [str, ...]} (the first turn is used) or {"prompt": str}."""
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"prompts file {path!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read prompts file {path!r}: {exc}") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not valid JSON ({exc.msg})") from None
        if isinstance(record, dict) and isinstance(record.get("turns"), list) and record["turns"] \
                and isinstance(record["turns"][0], str):
            prompts.append(record["turns"][0])
        elif isinstance(record, dict) and isinstance(record.get("prompt"), str):
            prompts.append(record["prompt"])
        else:
            raise ValueError(f'{where}: expected an object {{"turns": [str, ...]}} or {{"prompt": str}}')
    if not prompts:
        raise ValueError(f"prompts file {path!r} holds no prompts")
    return prompts


def _collect_prompts(entries: Optional[list]) -> list:
    """The tagged entries in order -> [("text", str) | ("ids", [int])]."""
    prompts = []
    for kind, value in entries or []:
        if kind == "file":
            prompts += [("text", text) for text in _read_prompts_file(value)]
        else:
            prompts.append((kind, value))
    if not prompts:
        raise ValueError("no prompts given; use --prompt TEXT, --prompt-ids 1,2,3 or --prompts-file FILE.jsonl")
    return prompts


def _apply_chat(tokenizer, prompts: list) -> list:
    """Wrap text prompts in the tokenizer's chat template (one user turn), returning token ids."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        _progress("note: --chat ignored: the target has no tokenizer with a chat template")
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
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos)
    config = EngineConfig(dtype=args.dtype, max_batch_size=args.max_batch_size, schedule=args.schedule,
                          verify_len=args.verify_len, threshold=args.threshold, cost_profile=args.cost_profile,
                          calibration=args.calibration)
    prompts = _collect_prompts(args.prompts)
    backend = get_backend(args.backend)

    started = time.perf_counter()
    _progress(f"loading target {args.target} (backend {backend.name}, device {backend.device}) ...")
    if args.draft is not None:
        _progress(f"loading draft {args.draft} ...")
    engine = Engine.from_pretrained(args.target, draft=args.draft, backend=backend, **config.to_dict())
    _progress(f"ready in {time.perf_counter() - started:.1f} s: dtype {str(engine.dtype).replace('torch.', '')}, "
              f"gamma {engine.gamma}" + ("" if args.draft else " (no draft: plain target decoding)"))

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
                         "finish_reason": o.finish_reason, "stats": o.stats} for o in outputs],
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
        _progress(f"[{o.index}] {len(o.token_ids)} tokens, {o.stats.get('rounds', 0)} rounds, tau {tau_text}, "
                  f"finish {o.finish_reason}")
    _progress(f"total: {total} tokens in {elapsed:.2f} s ({total / max(elapsed, 1e-9):.1f} tokens/s)")
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
        _progress(f"[{index}] {counts[index]} tokens, finish {reasons.get(index, 'length')}")
    total = sum(counts.values())
    _progress(f"total: {total} tokens in {elapsed:.2f} s ({total / max(elapsed, 1e-9):.1f} tokens/s)")
    return 0


# ----------------------------------------------------------------------------- init-draft
def _cmd_init_draft(args) -> int:
    names = ("num_layers", "block_size", "markov_rank", "markov_head_type", "mask_token_id", "target_layer_ids",
             "seed")
    options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    _progress(f"loading target {args.target} ...")
    path = init_draft(args.target, args.out, algorithm=args.algorithm, **options)
    if args.json:
        print(json.dumps({"draft": str(path), "algorithm": args.algorithm}))
    else:
        _progress(f"wrote an untrained {args.algorithm} draft:")
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
    except (BackendUnavailableError, ValueError) as exc:
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
                          "batched together, in command-line order."),
        epilog="examples:\n"
               "  dspark generate --target ./Qwen3-0.6B --draft ./draft --prompt 'Why is the sky blue?' --chat\n"
               "  dspark generate --target ./tiny --prompt-ids 1,2,3 --max-new-tokens 16 --ignore-eos --json\n"
               "  dspark generate --target ./Qwen3-0.6B --prompts-file mt_bench.jsonl --temperature 1 --seed 0")
    gen.add_argument("--target", required=True, metavar="DIR", help="target model directory (HF format)")
    gen.add_argument("--draft", metavar="DIR", help="draft directory (DeepSpec / dspark format); omit for "
                                                    "plain target decoding")
    gen.add_argument("--backend", choices=[*BACKENDS, "auto"], default=None,
                     help=f"device backend (default: ${ENV_VAR}, else auto)")
    group = gen.add_argument_group("prompts (repeatable, combined in order)")
    group.add_argument("--prompt", dest="prompts", action="append", type=_text_prompt, metavar="TEXT",
                       help="a text prompt (needs a tokenizer in the target directory)")
    group.add_argument("--prompt-ids", dest="prompts", action="append", type=_ids_prompt, metavar="IDS",
                       help="a prompt as comma-separated token ids, e.g. 1,2,3")
    group.add_argument("--prompts-file", dest="prompts", action="append", type=_file_prompt,
                       metavar="FILE.jsonl", help='JSON lines: {"turns": [str, ...]} (first turn) or {"prompt": str}')
    group.add_argument("--chat", action="store_true",
                       help="wrap text prompts in the tokenizer's chat template (add_generation_prompt=True)")
    sampling = gen.add_argument_group("sampling")
    sampling.add_argument("--max-new-tokens", type=int, default=_default(SamplingParams, "max_new_tokens"),
                          metavar="N", help="tokens to generate per prompt (default: %(default)s)")
    sampling.add_argument("--temperature", type=float, default=_default(SamplingParams, "temperature"),
                          metavar="T", help="0 = greedy (default: %(default)s)")
    sampling.add_argument("--top-k", type=int, default=_default(SamplingParams, "top_k"), metavar="K",
                          help="0 = off (default: %(default)s)")
    sampling.add_argument("--top-p", type=float, default=_default(SamplingParams, "top_p"), metavar="P",
                          help="1 = off (default: %(default)s)")
    sampling.add_argument("--seed", type=int, default=None, metavar="S",
                          help="per-request seed for reproducible sampling (default: random)")
    sampling.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence tokens")
    engine = gen.add_argument_group("engine")
    engine.add_argument("--schedule", choices=SCHEDULE_MODES, default=_default(EngineConfig, "schedule"),
                        help="fixed: verify --verify-len drafts (default: the whole block); threshold: while the "
                             "draft's survival >= --threshold; causal: paper Algorithm 1 against the device cost "
                             "model; budget: the zero-overhead load-aware variant. All but fixed need a DSpark "
                             "draft (default: %(default)s)")
    engine.add_argument("--cost-profile", metavar="FILE.yaml",
                        help="measured cost profile from `dspark calibrate` (default: the backend's analytic prior)")
    engine.add_argument("--calibration", choices=["offline", "online"], default="offline",
                        help="online: keep refitting the confidence temperatures while generating")
    engine.add_argument("--verify-len", type=int, default=None, metavar="N",
                        help="drafted tokens verified per round with --schedule fixed")
    engine.add_argument("--threshold", type=float, default=_default(EngineConfig, "threshold"), metavar="X",
                        help="survival threshold for --schedule threshold (default: %(default)s)")
    engine.add_argument("--max-batch-size", type=int, default=_default(EngineConfig, "max_batch_size"),
                        metavar="N", help="requests decoded together; more prompts queue (default: %(default)s)")
    engine.add_argument("--dtype", choices=["auto", *DTYPES], default=_default(EngineConfig, "dtype"),
                        help="weights dtype; auto = the backend's default (default: %(default)s)")
    output = gen.add_argument_group("output").add_mutually_exclusive_group()
    output.add_argument("--stream", action="store_true", help="print text as it is accepted")
    output.add_argument("--json", action="store_true", help="print one JSON document with ids, text and stats")
    gen.set_defaults(run=_cmd_generate)

    # --- init-draft
    init = commands.add_parser(
        "init-draft", formatter_class=formatter, help="create an untrained draft sized for a target",
        description=_para("Create an untrained draft directory (config.json + model.safetensors, DeepSpec layout) "
                          "shaped for a target: embedding and LM head copied from the target, other weights random. "
                          "Options left out take the algorithm's defaults or follow the target."),
        epilog="example:\n  dspark init-draft --target ./Qwen3-0.6B --out ./draft --num-layers 2 --block-size 7")
    init.add_argument("--target", required=True, metavar="DIR", help="target model directory (HF format)")
    init.add_argument("--out", required=True, metavar="DIR", help="where to write the draft")
    init.add_argument("--algorithm", choices=list(DRAFT_ALGORITHMS), default="dspark",
                      help="draft algorithm (default: %(default)s)")
    init.add_argument("--num-layers", type=int, metavar="N", help="draft decoder layers")
    init.add_argument("--block-size", type=int, metavar="N", help="tokens drafted per round (gamma)")
    init.add_argument("--markov-rank", type=int, metavar="R", help="rank of the Markov transition (dspark)")
    init.add_argument("--markov-head-type", choices=list(MARKOV_HEADS), help="Markov head variant (dspark)")
    init.add_argument("--mask-token-id", type=int, metavar="ID", help="token id used for mask slots "
                                                                      "(default: the last vocabulary id)")
    init.add_argument("--target-layer-ids", type=_int_list, metavar="IDS",
                      help="target layers whose hidden states feed the draft, e.g. 1,9,17")
    init.add_argument("--seed", type=int, metavar="S", help="seed for the random weights")
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:        # --help, --version, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    args.argv = list(sys.argv[1:] if argv is None else argv)    # for reports that record their command
    try:
        return args.run(args)
    except USER_ERRORS as exc:
        print(f"dspark: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dspark: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
