"""CLI commands for the scheduler's inputs: `calibrate` (device cost profile), `sts`
(confidence temperatures for a draft) and `simulate` (serving at any concurrency).
Registered by `dspark.cli.build_parser`; same error and output conventions."""
import json
import time
from pathlib import Path

import torch

from ..backends import ENV_VAR, get_backend
from ..bench.profiling import profile_engine
from ..bench.sts import fit_from_engine
from ..bench.simulator import DEFAULT_CONCURRENCY, markdown_table, plot, plot_cost_model, rows_as_dicts, simulate
from ..engine import Engine
from ..errors import ConfigError, DataError
from ..files import check_output, write_text_atomic
from ..models import DraftConfig
from ..models.checkpoint import model_dir, read_config, target_config
from ..params import DTYPES, SamplingParams
from ..prompts import prompt_ids, read_prompts
from ..scheduling.cost_model import DEVICE_SPECS, CostModel, ModelSpec, analytic_cost_model, device_spec
from .args import (add_backend, add_engine_flags, engine_config, float_list, positive_int, positive_int_list,
                   probability, progress)


# ----------------------------------------------------------------------------- calibrate
def _cmd_calibrate(args) -> int:
    # The outputs first: a measurement that cannot be saved is a measurement thrown away.
    inputs = [args.target, args.draft]
    out = check_output(args.out, "file", inputs=inputs)
    plot_path = check_output(args.plot, "file", flag="--plot", inputs=inputs) if args.plot else None
    config = engine_config(args)
    _check_context_lens(args, config.max_model_len)
    backend = get_backend(args.backend)
    progress(f"loading {args.target} + {args.draft or 'no draft'} on {backend.name} ...")
    engine = Engine.from_pretrained(args.target, draft=args.draft, backend=backend, **config.to_dict())
    started = time.perf_counter()
    profile = profile_engine(engine, context_lens=args.context_lens, repeats=args.repeats,
                             progress=progress)
    profile.meta.update(target=str(args.target), draft=str(args.draft))
    profile.to_yaml(out)
    progress(f"profiled in {time.perf_counter() - started:.1f} s; wrote {out}")
    if plot_path is not None:
        plot_cost_model(profile, plot_path)
        progress(f"wrote {plot_path}")
    print(str(out))
    return 0



def _check_context_lens(args, max_model_len) -> None:
    """--context-lens must fit the context the engine will have (--max-model-len, else the
    target's position limit capped at 4096, as the engine sizes it); read from a target
    directory's config.json before anything loads. A GGUF file or a model name is checked by
    the engine."""
    if args.context_lens is None or not (Path(args.target) / "config.json").is_file():
        return
    target_dir = model_dir(args.target, "target")
    limit = target_config(read_config(target_dir, "target"), str(target_dir / "config.json")).max_position_embeddings
    context = max_model_len or min(limit, 4096)
    too_long = [c for c in args.context_lens if c >= context]
    if too_long:
        raise ConfigError(f"--context-lens {','.join(map(str, too_long))} do not fit the engine's context of "
                          f"{context} positions (--max-model-len, at most max_position_embeddings {limit}); "
                          "choose smaller context lengths")


# ----------------------------------------------------------------------------- sts
def _cmd_sts(args) -> int:
    draft_path = model_dir(args.draft, "draft")
    config_path = draft_path / "config.json"
    if args.write:               # checked before the replay, which is the expensive part
        check_output(config_path, "file", flag="--draft", inputs=[args.target])
    prompt_records = read_prompts(args.prompts_file, limit=args.num_prompts) if args.prompts_file else None
    engine = Engine.from_pretrained(args.target, draft=draft_path, backend=args.backend,
                                    **engine_config(args).to_dict())
    if not engine.draft.has_confidence:
        raise ConfigError(f"draft {draft_path} has no confidence head: STS calibrates DSpark confidences")
    prompts = _sts_prompts(args, engine, prompt_records)
    params = [SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=i,
                             ignore_eos=True) for i in range(len(prompts))]
    progress(f"replaying {len(prompts)} prompts with full-block verification to collect confidences ...")
    fitted = fit_from_engine(engine, prompts, params)
    temperatures, before, after = fitted["temperatures"], fitted["before"], fitted["after"]
    if args.write:
        config = read_config(draft_path, "draft")
        config["confidence_temperatures"] = temperatures
        write_text_atomic(config_path, json.dumps(config, indent=2) + "\n")
        progress(f"wrote confidence_temperatures into {config_path}")
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


def _sts_prompts(args, engine, records) -> list:
    """Token-id prompts: from --prompts-file (read by dspark.prompts: errors name the file and
    line), else random ones."""
    if records is not None:
        if engine.tokenizer is None and any("prompt_ids" not in r for r in records):
            raise DataError("--prompts-file has text prompts and the target has no tokenizer; use "
                            '{"prompt_ids": [...]} lines or --random-prompts')
        return [prompt_ids(r, engine.tokenizer) for r in records]
    generator = torch.Generator().manual_seed(0)
    vocab = engine.target.config.vocab_size
    return [torch.randint(0, vocab, (int(n),), generator=generator).tolist()
            for n in torch.randint(2, 32, (args.num_prompts,), generator=generator)]


# ----------------------------------------------------------------------------- simulate
DEFAULT_CONTEXT_LEN = 1024
def _cmd_simulate(args) -> int:
    plot_path = check_output(args.plot, "file", flag="--plot") if args.plot else None
    if args.profile:
        cost = CostModel.from_yaml(args.profile)
    else:
        if not args.target:
            raise ConfigError("--device needs --target DIR (its config.json sizes the model); or pass --profile")
        target_dir = model_dir(args.target, "target")
        target_cfg = target_config(read_config(target_dir, "target"), str(target_dir / "config.json"))
        limit = target_cfg.max_position_embeddings
        if args.context_len is not None and args.context_len > limit:
            raise ConfigError(f"--context-len {args.context_len} is beyond the target's position limit {limit} "
                              f"(max_position_embeddings in {target_dir}/config.json)")
        args.context_len = args.context_len or min(DEFAULT_CONTEXT_LEN, limit)
        draft_cfg = None
        if args.draft:
            draft_dir = model_dir(args.draft, "draft")
            draft_cfg = DraftConfig.from_hf(read_config(draft_dir, "draft"), str(draft_dir / "config.json"))
        cost = analytic_cost_model(device_spec(args.device), ModelSpec.from_configs(target_cfg, draft_cfg))
    acceptance = _acceptance(args)
    _check_simulation_memory(args, len(acceptance))
    rows = simulate(cost, acceptance, concurrency=args.concurrency, rounds=args.rounds,
                    context_len=args.context_len or DEFAULT_CONTEXT_LEN, threshold=args.threshold)
    if plot_path is not None:
        plot(rows, plot_path, title=f"{cost.source} cost model: {cost.device}; acceptance "
                                    + ",".join(f"{a:.2f}" for a in acceptance))
        progress(f"wrote {plot_path}")
    if args.json:
        print(json.dumps({"device": cost.device, "source": cost.source, "acceptance": acceptance,
                          "rows": rows_as_dicts(rows)}))
    else:
        print(markdown_table(rows))
    return 0


def _check_simulation_memory(args, gamma: int) -> None:
    """The simulator draws every round's confidences and outcomes up front (float64
    [requests, gamma] per round, twice, plus two rounds of history): refuse a size whose draws
    cannot fit before the allocator is asked to try."""
    needed = max(args.concurrency) * gamma * 8 * (2 * args.rounds + 2)
    limit = get_backend("cpu").memory_limit()
    if limit is not None and needed > limit:
        raise ConfigError(f"--concurrency {max(args.concurrency)} x --rounds {args.rounds} needs "
                          f"{needed / 2 ** 30:.1f} GiB of simulated draws, more than the {limit / 2 ** 30:.1f} GiB "
                          "available; lower --concurrency or --rounds")


def _acceptance(args) -> list:
    if args.acceptance_file:
        path = args.acceptance_file
        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"--acceptance-file {path!r} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"--acceptance-file {path!r} is not a JSON document ({exc})") from None
        try:
            per_output = [o["stats"]["acceptance_by_position"] for o in document.get("outputs", [])]
        except (AttributeError, KeyError, TypeError):
            per_output = []
        if not per_output:
            raise DataError(f"{path} has no outputs[].stats.acceptance_by_position "
                            "(write one with `dspark generate --json --draft ...`)")
        columns = list(zip(*per_output))
        return [sum(v for v in col if v is not None) / max(1, sum(v is not None for v in col)) for col in columns]
    acceptance = args.acceptance
    if not all(0 < a < 1 for a in acceptance):
        raise ConfigError("--acceptance needs per-position conditional acceptance rates in (0, 1)")
    return acceptance


# ----------------------------------------------------------------------------- conformance
def _cmd_conformance(args) -> int:
    from ..conformance import matrix, run

    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or not dtypes:
        raise ConfigError(f"--dtypes takes a comma-separated subset of {', '.join(DTYPES)}, got {args.dtypes!r}")
    progress(f"checking backend {args.backend or 'from $' + ENV_VAR} against the CPU reference ...")
    results = run(args.backend, dtypes=dtypes)
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
    add_backend(conf)
    conf.add_argument("--dtypes", default="float32,bfloat16", metavar="LIST",
                      help="dtypes to check, comma-separated (default: %(default)s)")
    conf.add_argument("--json", action="store_true")
    conf.set_defaults(run=_cmd_conformance)

    cal = commands.add_parser(
        "calibrate", formatter_class=formatter, help="measure this device's cost profile for the scheduler",
        description=para("Run the engine's own online cost estimator offline: decode random prompts at request "
                         "counts up to --max-batch-size, verify lengths 0..gamma and a few context lengths, time "
                         "every round (draft and verify) as serving does, and write what it learned as a YAML cost "
                         "profile that `generate --cost-profile` and `simulate --profile` use (an engine started "
                         "from it keeps refining it online)."),
        epilog="example:\n  dspark calibrate --target ./tgt --draft ./draft --out cpu.yaml --plot cpu.png")
    cal.add_argument("--target", required=True, metavar="DIR")
    cal.add_argument("--draft", metavar="DIR", help="the draft whose round is timed too")
    add_backend(cal)
    cal.add_argument("--out", required=True, metavar="FILE.yaml",
                     help="the profile to write (checked before profiling; an existing file is replaced)")
    cal.add_argument("--plot", metavar="FILE.png", help="also plot the profile (needs matplotlib)")
    cal.add_argument("--context-lens", type=positive_int_list, metavar="LIST",
                     help="context buckets, each below the engine's context (default 64,256, those that fit)")
    cal.add_argument("--repeats", type=positive_int, default=5, metavar="N",
                     help="rounds per (requests, verify length, context) point, at least; each cell keeps "
                          "the median (default: %(default)s)")
    add_engine_flags(cal.add_argument_group("engine (largest R profiled = --max-batch-size)"),
                     only=("dtype", "max_batch_size", "max_model_len", "static_shapes", "graphs"),
                     defaults={"max_batch_size": 8})
    cal.set_defaults(run=_cmd_calibrate)

    sts = commands.add_parser(
        "sts", formatter_class=formatter, help="fit STS confidence temperatures for a DSpark draft",
        description=para("Replay prompts with full-block verification, fit Sequential Temperature Scaling on "
                         "half of the rounds and report ECE / AUROC / Brier per position on the other half; "
                         "--write stores the temperatures in the draft's config.json."),
        epilog="example:\n  dspark sts --target ./tgt --draft ./draft --random-prompts --num-prompts 64 --write")
    sts.add_argument("--target", required=True, metavar="DIR")
    sts.add_argument("--draft", required=True, metavar="DIR")
    add_backend(sts)
    source = sts.add_mutually_exclusive_group()
    source.add_argument("--prompts-file", metavar="FILE.jsonl",
                        help='{"turns": [...]}, {"prompt": ...}, {"messages": [...]} or {"prompt_ids": [...]} lines')
    source.add_argument("--random-prompts", action="store_true", help="random token-id prompts (default)")
    sts.add_argument("--num-prompts", type=positive_int, default=64, metavar="N")
    sts.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N")
    sts.add_argument("--temperature", type=float, default=1.0, metavar="T")
    sts.add_argument("--write", action="store_true",
                     help="store the temperatures in the draft's config.json (replaced atomically)")
    add_engine_flags(sts.add_argument_group("engine"), only=("dtype", "max_batch_size"),
                     defaults={"max_batch_size": 16})
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
    accept.add_argument("--acceptance", type=float_list, metavar="LIST",
                        help="per-position conditional acceptance, e.g. 0.8,0.7")
    accept.add_argument("--acceptance-file", metavar="FILE.json", help="`dspark generate --json` output")
    sim.add_argument("--concurrency", type=positive_int_list, default=",".join(map(str, DEFAULT_CONCURRENCY)),
                     metavar="LIST", help="requests served at once, e.g. 1,16,256")
    sim.add_argument("--rounds", type=positive_int, default=64, metavar="N", help="rounds per point (default 64)")
    sim.add_argument("--context-len", type=positive_int, metavar="N",
                     help=f"context length simulated (default: {DEFAULT_CONTEXT_LEN}, or the target's position limit "
                          "if lower; at most that limit)")
    sim.add_argument("--threshold", type=probability, default=0.5, metavar="X")
    sim.add_argument("--plot", metavar="FILE.png")
    sim.add_argument("--json", action="store_true")
    sim.set_defaults(run=_cmd_simulate)
