"""CLI commands for the scheduler's inputs: `calibrate` (device cost profile), `sts`
(confidence temperatures for a draft) and `simulate` (serving at any concurrency).
Registered by `dspark.cli.build_parser`; same error and output conventions."""
import json
import sys
import time
from pathlib import Path

import torch

from ..backends import BACKENDS, ENV_VAR, get_backend
from ..bench.profiling import profile_engine
from ..bench.sts import fit_from_engine
from ..bench.simulator import DEFAULT_CONCURRENCY, markdown_table, plot, plot_cost_model, rows_as_dicts, simulate
from ..engine import Engine
from ..models import DraftConfig
from ..models.checkpoint import model_dir, read_config, target_config
from ..params import SamplingParams
from ..scheduling.cost_model import DEVICE_SPECS, CostModel, ModelSpec, analytic_cost_model, device_spec


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _floats(text: str) -> list:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


# ----------------------------------------------------------------------------- calibrate
def _cmd_calibrate(args) -> int:
    backend = get_backend(args.backend)
    _progress(f"loading {args.target} + {args.draft or 'no draft'} on {backend.name} ...")
    engine = Engine.from_pretrained(args.target, draft=args.draft, backend=backend,
                                    max_batch_size=args.max_batch_size, dtype=args.dtype)
    started = time.perf_counter()
    profile = profile_engine(engine, context_lens=_ints(args.context_lens), repeats=args.repeats, progress=_progress)
    profile.meta.update(target=str(args.target), draft=str(args.draft))
    profile.to_yaml(args.out)
    _progress(f"profiled in {time.perf_counter() - started:.1f} s; wrote {args.out}")
    if args.plot:
        plot_cost_model(profile, args.plot)
        _progress(f"wrote {args.plot}")
    print(str(args.out))
    return 0


# ----------------------------------------------------------------------------- sts
def _cmd_sts(args) -> int:
    draft_path = model_dir(args.draft, "draft")
    engine = Engine.from_pretrained(args.target, draft=draft_path, backend=args.backend,
                                    max_batch_size=args.max_batch_size)
    if not engine.draft.has_confidence:
        raise ValueError(f"draft {draft_path} has no confidence head: STS calibrates DSpark confidences")
    prompts = _sts_prompts(args, engine)
    params = [SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=i,
                             ignore_eos=True) for i in range(len(prompts))]
    _progress(f"replaying {len(prompts)} prompts with full-block verification to collect confidences ...")
    fitted = fit_from_engine(engine, prompts, params)
    temperatures, before, after = fitted["temperatures"], fitted["before"], fitted["after"]
    if args.write:
        config_path = draft_path / "config.json"
        config = json.loads(config_path.read_text())
        config["confidence_temperatures"] = temperatures
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        _progress(f"wrote confidence_temperatures into {config_path}")
    document = {"temperatures": temperatures, "rounds": fitted["rows"], "held_out_before": before,
                "held_out_after": after}
    if args.json:
        print(json.dumps(document))
        return 0
    print(f"STS temperatures: {', '.join(f'{t:.3f}' for t in temperatures)}  ({fitted['rows']} request-rounds)")
    print("| position | rows | ECE before | ECE after | AUROC | Brier before | Brier after |")
    print("|---|---|---|---|---|---|---|")
    for b, a in zip(before, after):
        print(f"| {b['position']} | {b['count']} | {b['ece']:.4f} | {a['ece']:.4f} | {a['auroc']:.3f} | "
              f"{b['brier']:.4f} | {a['brier']:.4f} |")
    return 0


def _sts_prompts(args, engine) -> list:
    if args.prompts_file:
        if engine.tokenizer is None:
            raise ValueError("--prompts-file needs a tokenizer in the target directory; use --random-prompts")
        prompts = []
        for number, line in enumerate(Path(args.prompts_file).read_text().splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                prompts.append(record["turns"][0] if "turns" in record else record["prompt"])
        return prompts[:args.num_prompts]
    generator = torch.Generator().manual_seed(0)
    vocab = engine.target.config.vocab_size
    return [torch.randint(0, vocab, (int(n),), generator=generator).tolist()
            for n in torch.randint(2, 32, (args.num_prompts,), generator=generator)]


# ----------------------------------------------------------------------------- simulate
def _cmd_simulate(args) -> int:
    if args.profile:
        cost = CostModel.from_yaml(args.profile)
    else:
        if not args.target:
            raise ValueError("--device needs --target DIR (its config.json sizes the model); or pass --profile")
        target_dir = model_dir(args.target, "target")
        target_cfg = target_config(read_config(target_dir, "target"), str(target_dir / "config.json"))
        draft_cfg = None
        if args.draft:
            draft_dir = model_dir(args.draft, "draft")
            draft_cfg = DraftConfig.from_hf(read_config(draft_dir, "draft"), str(draft_dir / "config.json"))
        cost = analytic_cost_model(device_spec(args.device), ModelSpec.from_configs(target_cfg, draft_cfg))
    acceptance = _acceptance(args)
    rows = simulate(cost, acceptance, concurrency=_ints(args.concurrency), rounds=args.rounds,
                    context_len=args.context_len, threshold=args.threshold)
    if args.plot:
        plot(rows, args.plot, title=f"{cost.source} cost model: {cost.device}; acceptance "
                                    + ",".join(f"{a:.2f}" for a in acceptance))
        _progress(f"wrote {args.plot}")
    if args.json:
        print(json.dumps({"device": cost.device, "source": cost.source, "acceptance": acceptance,
                          "rows": rows_as_dicts(rows)}))
    else:
        print(markdown_table(rows))
    return 0


def _acceptance(args) -> list:
    if args.acceptance_file:
        document = json.loads(Path(args.acceptance_file).read_text())
        per_output = [o["stats"]["acceptance_by_position"] for o in document.get("outputs", [])]
        if not per_output:
            raise ValueError(f"{args.acceptance_file} has no outputs[].stats.acceptance_by_position "
                             "(write one with `dspark generate --json --draft ...`)")
        columns = list(zip(*per_output))
        return [sum(v for v in col if v is not None) / max(1, sum(v is not None for v in col)) for col in columns]
    acceptance = _floats(args.acceptance)
    if not acceptance or not all(0 < a < 1 for a in acceptance):
        raise ValueError("--acceptance needs per-position conditional acceptance rates in (0, 1)")
    return acceptance


# ----------------------------------------------------------------------------- conformance
def _cmd_conformance(args) -> int:
    from ..conformance import matrix, run

    _progress(f"checking backend {args.backend or 'from $' + ENV_VAR} against the CPU reference ...")
    results = run(args.backend, dtypes=tuple(args.dtypes.split(",")))
    if args.json:
        print(json.dumps([r.__dict__ for r in results]))
    else:
        print(matrix(results))
        for r in results:
            if r.status == "fail":
                print(f"FAIL {r.operation} [{r.mode} {r.dtype}]: {r.detail}")
    return 1 if any(r.status == "fail" for r in results) else 0


# ----------------------------------------------------------------------------- parsers
def add_commands(commands, formatter, para) -> None:
    conf = commands.add_parser(
        "conformance", formatter_class=formatter, help="check a backend against the CPU reference",
        description=para("Run the conformance checks (sampling, attention, draft block, verification bit-exact / "
                         "greedy / sampled, schedulers, end-to-end lossless generation) on a backend and print "
                         "the operation x mode matrix. Exit status 1 when any check fails."),
        epilog="example:\n  dspark conformance --backend cuda")
    conf.add_argument("--backend", choices=[*BACKENDS, "auto"], help=f"default: ${ENV_VAR}, else auto")
    conf.add_argument("--dtypes", default="float32,bfloat16", metavar="LIST")
    conf.add_argument("--json", action="store_true")
    conf.set_defaults(run=_cmd_conformance)

    cal = commands.add_parser(
        "calibrate", formatter_class=formatter, help="measure this device's cost profile for the scheduler",
        description=para("Time the target forward over B verify tokens (at a few context lengths) and the draft "
                         "round for R requests on this backend; write a YAML cost profile that "
                         "`generate --cost-profile` and `simulate --profile` use."),
        epilog="example:\n  dspark calibrate --target ./tgt --draft ./draft --out cpu.yaml --plot cpu.png")
    cal.add_argument("--target", required=True, metavar="DIR")
    cal.add_argument("--draft", metavar="DIR", help="the draft whose round is timed too")
    cal.add_argument("--backend", choices=[*BACKENDS, "auto"], help=f"default: ${ENV_VAR}, else auto")
    cal.add_argument("--out", required=True, metavar="FILE.yaml")
    cal.add_argument("--plot", metavar="FILE.png", help="also plot the profile (needs matplotlib)")
    cal.add_argument("--max-batch-size", type=int, default=8, metavar="N", help="largest R profiled (default 8)")
    cal.add_argument("--context-lens", default="64,256", metavar="LIST", help="context buckets (default 64,256)")
    cal.add_argument("--repeats", type=int, default=5, metavar="N", help="timed repeats; the median is kept")
    cal.add_argument("--dtype", default="auto")
    cal.set_defaults(run=_cmd_calibrate)

    sts = commands.add_parser(
        "sts", formatter_class=formatter, help="fit STS confidence temperatures for a DSpark draft",
        description=para("Replay prompts with full-block verification, fit Sequential Temperature Scaling on "
                         "half of the rounds and report ECE / AUROC / Brier per position on the other half; "
                         "--write stores the temperatures in the draft's config.json."),
        epilog="example:\n  dspark sts --target ./tgt --draft ./draft --random-prompts --num-prompts 64 --write")
    sts.add_argument("--target", required=True, metavar="DIR")
    sts.add_argument("--draft", required=True, metavar="DIR")
    sts.add_argument("--backend", choices=[*BACKENDS, "auto"])
    source = sts.add_mutually_exclusive_group()
    source.add_argument("--prompts-file", metavar="FILE.jsonl", help='{"turns": [...]} or {"prompt": ...} lines')
    source.add_argument("--random-prompts", action="store_true", help="random token-id prompts (default)")
    sts.add_argument("--num-prompts", type=int, default=64, metavar="N")
    sts.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    sts.add_argument("--temperature", type=float, default=1.0, metavar="T")
    sts.add_argument("--max-batch-size", type=int, default=16, metavar="N")
    sts.add_argument("--write", action="store_true", help="store the temperatures in the draft's config.json")
    sts.add_argument("--json", action="store_true")
    sts.set_defaults(run=_cmd_sts)

    sim = commands.add_parser(
        "simulate", formatter_class=formatter, help="simulate serving vs concurrency for each scheduling mode",
        description=para("Combine a cost model (a measured --profile, or an analytic prior for --device sized "
                         "by --target/--draft config.json) with per-position acceptance rates, and report per-user "
                         "and aggregate tokens/s at each concurrency for no speculation, fixed lengths, threshold, "
                         "causal and budget scheduling."),
        epilog="examples:\n  dspark simulate --device h100 --target ./Qwen3-8B --draft ./draft "
               "--acceptance 0.85,0.8,0.75,0.7,0.65,0.6,0.55 --plot h100.png\n"
               "  dspark simulate --profile cpu.yaml --acceptance-file run.json")
    cost = sim.add_mutually_exclusive_group(required=True)
    cost.add_argument("--profile", metavar="FILE.yaml", help="a measured profile from `dspark calibrate`")
    cost.add_argument("--device", choices=list(DEVICE_SPECS), help="an analytic device prior")
    sim.add_argument("--target", metavar="DIR", help="target directory (config.json only) for --device")
    sim.add_argument("--draft", metavar="DIR", help="draft directory (config.json only) for --device")
    accept = sim.add_mutually_exclusive_group(required=True)
    accept.add_argument("--acceptance", metavar="LIST", help="per-position conditional acceptance, e.g. 0.8,0.7")
    accept.add_argument("--acceptance-file", metavar="FILE.json", help="`dspark generate --json` output")
    sim.add_argument("--concurrency", default=",".join(map(str, DEFAULT_CONCURRENCY)), metavar="LIST")
    sim.add_argument("--rounds", type=int, default=64, metavar="N", help="rounds per point (default 64)")
    sim.add_argument("--context-len", type=int, default=1024, metavar="N")
    sim.add_argument("--threshold", type=float, default=0.5, metavar="X")
    sim.add_argument("--plot", metavar="FILE.png")
    sim.add_argument("--json", action="store_true")
    sim.set_defaults(run=_cmd_simulate)
