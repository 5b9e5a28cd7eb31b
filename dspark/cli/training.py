"""CLI commands for draft training: `regenerate` (target-written responses) and `train`.
Registered by `dspark.cli.build_parser`; same error and output conventions."""
from pathlib import Path

from ..models import DRAFT_ALGORITHMS
from .args import add_backend, non_negative_int, positive_float, positive_int, progress


def _cmd_regenerate(args) -> int:
    from ..engine import Engine
    from ..params import SamplingParams
    from ..prompts import read_prompts
    from ..training.data import check_regenerate_output, regenerate, regenerate_settings

    # Everything that can be refused is refused before the target loads: the prompts, --out (not
    # an input, writable, and if it exists a file this command wrote with the same settings).
    prompts = read_prompts(args.prompts, limit=args.limit)
    SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)  # checks them
    settings = regenerate_settings(args.max_new_tokens, args.temperature, args.seed)
    check_regenerate_output(args.out, settings, inputs=[args.prompts, args.target])
    progress(f"loading target {args.target} ...")
    engine = Engine.from_pretrained(args.target, backend=args.backend, max_batch_size=args.batch_size)
    path = regenerate(engine, prompts, args.out, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, seed=args.seed, progress=progress)
    print(str(path))
    return 0


# TrainConfig fields that are also flags (same name); the draft's sizes go to draft_options.
TRAIN_FLAGS = ("target", "data", "out", "algorithm", "steps", "global_batch", "micro_batch", "lr", "num_anchors",
               "max_length", "precision", "seed", "init", "log_every", "checkpoint_every", "backend", "features",
               "cache_dir", "shard_target")
DRAFT_FLAGS = ("num_layers", "block_size", "markov_rank", "from_target")


def _cmd_train(args) -> int:
    from ..training import TrainConfig, train

    cfg = TrainConfig.from_yaml(args.config, **{name: getattr(args, name) for name in TRAIN_FLAGS})
    options = {name: getattr(args, name) for name in DRAFT_FLAGS if getattr(args, name) is not None}
    if options:
        cfg.draft_options = {**cfg.draft_options, **options}
    _absolute_paths(cfg)
    out = train(cfg, progress=progress, fresh=args.fresh)
    print(str(out))
    return 0


def _absolute(path):
    """An existing path (or a new --out) as an absolute one; a model name stays a name."""
    if path is None or path == "":
        return path
    return str(Path(path).expanduser().resolve()) if Path(path).expanduser().exists() else path


def _absolute_paths(cfg) -> None:
    """Record the run's paths absolutely, so a rerun that spells them differently (`run`, `./run`,
    `/home/me/run`) is recognised as the same run by the resume check instead of refused."""
    cfg.target, cfg.init, cfg.cache_dir = _absolute(cfg.target), _absolute(cfg.init), _absolute(cfg.cache_dir)
    cfg.out = str(Path(cfg.out).expanduser().resolve()) if cfg.out else cfg.out
    if isinstance(cfg.data, (list, tuple)):
        cfg.data = [_absolute(path) for path in cfg.data_files]
    elif cfg.data:
        cfg.data = ",".join(_absolute(path) for path in cfg.data_files)


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
    regen.add_argument("--out", required=True, metavar="FILE.jsonl",
                       help="responses are appended; an existing file must come from this command with the same "
                            "settings (its prompts are skipped)")
    regen.add_argument("--limit", type=positive_int, metavar="N", help="use the first N prompts")
    regen.add_argument("--max-new-tokens", type=positive_int, default=256, metavar="N")
    regen.add_argument("--temperature", type=float, default=0.0, metavar="T")
    regen.add_argument("--batch-size", type=positive_int, default=16, metavar="N", help="requests decoded together")
    regen.add_argument("--seed", type=int, default=0, metavar="S")
    add_backend(regen)
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
    train.add_argument("--out", metavar="DIR", help="the run's directory; rerunning resumes it (same settings), "
                                                    "--fresh starts over")
    train.add_argument("--fresh", action="store_true",
                       help="discard an earlier run in --out (checkpoint, initial draft, metrics) and start over")
    train.add_argument("--init", metavar="DIR", help="start from this draft instead of a fresh one")
    train.add_argument("--steps", type=positive_int, metavar="N")
    train.add_argument("--global-batch", type=positive_int, metavar="N",
                       help="sequences per step over all processes")
    train.add_argument("--micro-batch", type=positive_int, metavar="N", help="sequences per forward (accumulation)")
    train.add_argument("--lr", type=positive_float, metavar="X", help="peak learning rate (> 0)")
    train.add_argument("--num-anchors", type=positive_int, metavar="N", help="anchors per sequence (default 512)")
    train.add_argument("--max-length", type=positive_int, metavar="N")
    train.add_argument("--precision", choices=["fp32", "bf16"])
    train.add_argument("--num-layers", type=positive_int, metavar="N", help="draft layers (new drafts)")
    train.add_argument("--block-size", type=positive_int, metavar="N", help="gamma (new drafts)")
    train.add_argument("--markov-rank", type=non_negative_int, metavar="R", help="Markov rank (new DSpark drafts)")
    train.add_argument("--from-target", action="store_true", default=None,
                       help="new drafts start from the target's last layer and final norm (see init-draft --help)")
    train.add_argument("--seed", type=int)
    train.add_argument("--log-every", type=positive_int, metavar="N")
    train.add_argument("--checkpoint-every", type=positive_int, metavar="N")
    train.add_argument("--features", choices=["online", "cached"],
                       help="online (default): the target runs inside each step; cached: precompute once into "
                            "sharded safetensors (size printed first)")
    train.add_argument("--cache-dir", metavar="DIR", help="feature cache location (default: <out>/feature_cache)")
    train.add_argument("--shard-target", action="store_true", default=None,
                       help="under torchrun: shard the frozen target over the processes with FSDP2, for targets "
                            "that do not fit one device (with --features online; see docs/DISTRIBUTED.md)")
    add_backend(train)
    train.set_defaults(run=_cmd_train)
