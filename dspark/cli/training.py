"""CLI commands for draft training: `regenerate` (target-written responses) and `train`.
Registered by `dspark.cli.build_parser`; same error and output conventions."""
import sys

from ..backends import BACKENDS, ENV_VAR
from ..models import DRAFT_ALGORITHMS


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _cmd_regenerate(args) -> int:
    from ..engine import Engine
    from ..prompts import read_prompts
    from ..training.data import regenerate

    prompts = read_prompts(args.prompts, limit=args.limit)
    _progress(f"loading target {args.target} ...")
    engine = Engine.from_pretrained(args.target, backend=args.backend, max_batch_size=args.batch_size)
    path = regenerate(engine, prompts, args.out, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, seed=args.seed, progress=_progress)
    print(str(path))
    return 0


def _cmd_train(args) -> int:
    from ..training import TrainConfig, train

    options = {k: v for k, v in (("num_layers", args.num_layers), ("block_size", args.block_size),
                                  ("markov_rank", args.markov_rank)) if v is not None}
    overrides = dict(target=args.target, data=args.data, out=args.out, algorithm=args.algorithm, steps=args.steps,
                     global_batch=args.global_batch, micro_batch=args.micro_batch, lr=args.lr,
                     num_anchors=args.num_anchors, max_length=args.max_length, precision=args.precision,
                     seed=args.seed, init=args.init, log_every=args.log_every,
                     checkpoint_every=args.checkpoint_every, backend=args.backend, features=args.features,
                     cache_dir=args.cache_dir)
    cfg = TrainConfig.from_yaml(args.config, **overrides)
    if options:
        cfg.draft_options = {**cfg.draft_options, **options}
    out = train(cfg, progress=_progress)
    print(str(out))
    return 0


def add_commands(commands, formatter, para) -> None:
    regen = commands.add_parser(
        "regenerate", formatter_class=formatter, help="write the target's own responses to prompts (training data)",
        description=para("Generate the target's responses to prompts from a JSONL file ({\"turns\": [...]}, "
                         "{\"question\": ...}, {\"prompt\": ...} or {\"prompt_ids\": [...]}) through dspark's engine "
                         "and append them to an output JSONL; rerunning resumes where it stopped."),
        epilog="example:\n  dspark regenerate --target ./Qwen3-0.6B --prompts ../shared/data/train/gsm8k_train.jsonl "
               "--out train.jsonl --limit 2000")
    regen.add_argument("--target", required=True, metavar="DIR")
    regen.add_argument("--prompts", required=True, metavar="FILE.jsonl")
    regen.add_argument("--out", required=True, metavar="FILE.jsonl")
    regen.add_argument("--limit", type=int, metavar="N", help="use the first N prompts")
    regen.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    regen.add_argument("--temperature", type=float, default=0.0, metavar="T")
    regen.add_argument("--batch-size", type=int, default=16, metavar="N")
    regen.add_argument("--seed", type=int, default=0, metavar="S")
    regen.add_argument("--backend", choices=[*BACKENDS, "auto"], help=f"default: ${ENV_VAR}, else auto")
    regen.set_defaults(run=_cmd_regenerate)

    train = commands.add_parser(
        "train", formatter_class=formatter, help="train a DSpark / DFlash / EAGLE-3 draft for a target",
        description=para("Train a draft with online target features (the frozen target runs inside each step; "
                         "nothing is cached). A YAML --config holds every setting (see "
                         "dspark.training.TrainConfig); flags override it. Checkpoints are written atomically and "
                         "a rerun resumes; multi-process with `torchrun --nproc_per_node N -m dspark train ...`. "
                         "The output directory is a draft that `dspark generate --draft` loads directly."),
        epilog="examples:\n  dspark train --target ./tgt --algorithm dspark --data train.jsonl --out ./draft --steps 500\n"
               "  torchrun --nproc_per_node 2 -m dspark train --config run.yaml")
    train.add_argument("--config", metavar="FILE.yaml", help="a TrainConfig as YAML")
    train.add_argument("--target", metavar="DIR")
    train.add_argument("--algorithm", choices=list(DRAFT_ALGORITHMS))
    train.add_argument("--data", metavar="FILE.jsonl", help="regenerated conversations (dspark regenerate)")
    train.add_argument("--out", metavar="DIR")
    train.add_argument("--init", metavar="DIR", help="start from this draft instead of a fresh one")
    train.add_argument("--steps", type=int, metavar="N")
    train.add_argument("--global-batch", type=int, metavar="N", help="sequences per step over all processes")
    train.add_argument("--micro-batch", type=int, metavar="N", help="sequences per forward (accumulation)")
    train.add_argument("--lr", type=float)
    train.add_argument("--num-anchors", type=int, metavar="N", help="anchors per sequence (default 512)")
    train.add_argument("--max-length", type=int, metavar="N")
    train.add_argument("--precision", choices=["fp32", "bf16"])
    train.add_argument("--num-layers", type=int, metavar="N", help="draft layers (new drafts)")
    train.add_argument("--block-size", type=int, metavar="N", help="gamma (new drafts)")
    train.add_argument("--markov-rank", type=int, metavar="R", help="Markov rank (new DSpark drafts)")
    train.add_argument("--seed", type=int)
    train.add_argument("--log-every", type=int, metavar="N")
    train.add_argument("--checkpoint-every", type=int, metavar="N")
    train.add_argument("--features", choices=["online", "cached"],
                       help="online (default): the target runs inside each step; cached: precompute once into "
                            "sharded safetensors (size printed first)")
    train.add_argument("--cache-dir", metavar="DIR", help="feature cache location (default: <out>/feature_cache)")
    train.add_argument("--backend", choices=[*BACKENDS, "auto"])
    train.set_defaults(run=_cmd_train)
