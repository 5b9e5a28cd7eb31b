"""CLI command `export`: write a draft in the layout another engine loads (vLLM, vllm-ascend,
SGLang, DeepSpec, the speculators library, an official EAGLE-3 release), with a README that
holds the launch lines, and optionally the measured cost profile as an SPS table.
Registered by `dspark.cli.build_parser`; same error and output conventions."""
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import ConfigError
from ..files import atomic_output, check_output, write_text_atomic
from ..models.checkpoint import load_target, model_dir, read_config, read_weights, target_config
from ..models.drafts.formats import (EXPORT_FORMATS, LAYER_INPUT, LAYER_OUTPUT, LAYOUTS, SIDECAR, convert_layer_ids,
                                     detect_layout, export_draft, import_draft, sidecar_for)
from ..models.drafts.io import SHARED_WITH_TARGET, load_draft

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Fields of the draft's own config.json that describe the target and travel into any layout.
TARGET_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings", "torch_dtype", "dtype")


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _stored_dtype(weights: dict) -> torch.dtype:
    """The floating dtype most of the draft's tensors are stored in."""
    counts = Counter(t.dtype for t in weights.values() if t.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float32


def _cast(tensor: torch.Tensor, dtype: torch.dtype, exact_only: bool) -> torch.Tensor:
    """`tensor` in `dtype`; with exact_only, a tensor that would lose bits keeps its precision
    (a float32 target's embedding beside a bfloat16 draft), so export then import is bit-exact."""
    if not tensor.is_floating_point():
        return tensor.contiguous()
    cast = tensor.to(dtype)
    if exact_only and not torch.equal(cast.to(tensor.dtype), tensor):
        return tensor.contiguous()
    return cast.contiguous()


def _refuse_foreign_output(out: Path) -> None:
    """An existing config.json in --out must be a draft (any layout): never overwrite a target."""
    config = out / "config.json"
    if not config.is_file():
        return
    try:
        detect_layout(read_config(out, "output"), str(config))
    except Exception:                      # not a draft, or not readable: leave it alone
        raise ConfigError(f"--out {str(out)!r} holds a model that is not a draft; exporting there would replace "
                          "it. Choose another --out") from None


def _readme(exported, draft: str, out: Path, target: str, cfg, has_costs: bool) -> str:
    layer_ids = list(cfg.target_layer_ids)
    inputs = convert_layer_ids(layer_ids, LAYER_OUTPUT, LAYER_INPUT)
    lines = [f"# {cfg.algorithm} draft, exported by dspark for {exported.format}", "",
             f"Layout: {exported.layout} ({LAYOUTS[exported.layout]}). Exported from `{draft}`.", "",
             f"- tokens drafted per round (gamma): {cfg.block_size}",
             f"- target layers read: outputs of layers {layer_ids} = HF `hidden_states` {inputs} "
             f"(= inputs of layers {inputs}, the numbering vLLM and the official EAGLE-3 code use)",
             f"- draft vocabulary: {cfg.output_size} of {cfg.vocab_size} tokens", "",
             "## Launch", ""]
    for engine, line in exported.launch.items():
        line = line.replace("<draft>", str(out)).replace("<target>", target)
        lines += [f"{engine}:", "", "```bash" if engine != "eagle" else "```python", line, "```", ""]
    if exported.layout == "eagle3-sglang":
        lines += ["Serve this directory with SGLang only: its layer ids are SGLang's (layer outputs). For vLLM "
                  "(on GPUs or Ascend NPUs) export with `--format vllm`, which writes vLLM's numbering (layer "
                  "inputs).", ""]
    if "vllm" in exported.launch:
        lines += ["vllm-ascend: the same `vllm serve` line on an Ascend NPU host with the vllm-ascend plugin "
                  "installed (it registers itself as a vLLM platform; support for this method depends on "
                  "the vllm-ascend release).", ""]
    if has_costs:
        lines += ["## Cost table", "", "`sps_table.json` holds the measured step costs (format in "
                  "`dspark.scheduling.sps_table`). Neither vLLM nor SGLang reads a cost-table file; their "
                  "DSpark planners profile the device at start-up.", ""]
    lines += [f"`{SIDECAR}` keeps what this layout cannot (gamma, STS temperatures, ...) so that `dspark` "
              "reads the directory back unchanged; engines ignore it.", ""]
    return "\n".join(lines)


def _cmd_export(args) -> int:
    draft_dir = model_dir(args.draft, "draft")
    out = check_output(args.out, "dir", "--out", inputs=[draft_dir, args.target])
    _refuse_foreign_output(out)
    source_hf = read_config(draft_dir, "draft")
    source_weights = read_weights(draft_dir, "draft")

    target_model = target_cfg = target_hf = None
    if args.target:
        target_path = model_dir(args.target, "target")
        target_hf = read_config(target_path, "target")
        target_cfg = target_config(target_hf, str(target_path / "config.json"))
    layout, _, native = import_draft(draft_dir, source_hf, source_weights, target_cfg)
    missing = [name for name in SHARED_WITH_TARGET if name not in native]
    if missing and not args.target:
        raise ConfigError(f"draft {args.draft} stores no {', '.join(missing)} (it shares them with its target); "
                          "pass --target DIR so the export can include them")
    if missing:
        _progress(f"loading target {args.target} for {', '.join(missing)} ...")
        target_model, _ = load_target(target_path, torch.device("cpu"), torch.float32)
    model = load_draft(draft_dir, target_cfg, target_model)
    _progress(f"draft {args.draft}: {layout} layout, {model.config.algorithm}; writing {args.format} -> {out}")

    base = source_hf if layout == "deepspec" else {k: source_hf[k] for k in TARGET_FIELDS if k in source_hf}
    if target_hf is not None and layout != "deepspec":
        base.update({k: target_hf[k] for k in TARGET_FIELDS if k in target_hf and k not in base})
    if target_hf is not None and "max_position_embeddings" in target_hf:
        # The draft serves the target's context: never pass on a release's 2048 (official
        # EAGLE-3 configs say 2048 whatever the target; vLLM and SGLang would cap the draft there).
        base = {**base, "max_position_embeddings": target_hf["max_position_embeddings"]}
    verifier = {"name_or_path": args.target, "architectures": (target_hf or {}).get("architectures") or []}
    exported = export_draft(model, args.format, base, verifier)

    dtype = DTYPES[args.dtype] if args.dtype != "auto" else _stored_dtype(source_weights)
    tensors = {name: _cast(t, dtype, exact_only=args.dtype == "auto") for name, t in exported.weights.items()}
    exported.config["torch_dtype"] = str(dtype).replace("torch.", "")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_output(out / "model.safetensors") as temporary:
        save_file(tensors, str(temporary), metadata={"format": "pt"})
    write_text_atomic(out / SIDECAR, json.dumps(sidecar_for(model.config), indent=2) + "\n")
    has_costs = args.cost_profile is not None
    if has_costs:
        from ..scheduling.cost_model import CostModel
        from ..scheduling.sps_table import write_sps_table

        write_sps_table(CostModel.from_yaml(args.cost_profile), out / "sps_table.json")
    write_text_atomic(out / "README.md", _readme(exported, args.draft, out, args.target or "<target>",
                                                 model.config, has_costs))
    write_text_atomic(out / "config.json", json.dumps(exported.config, indent=2) + "\n")   # last: marks it done
    for engine, line in exported.launch.items():
        _progress(f"{engine}: {line.replace('<draft>', str(out)).replace('<target>', args.target or '<target>')}")
    print(str(out))
    return 0


def add_commands(commands, formatter, para) -> None:
    export = commands.add_parser(
        "export", formatter_class=formatter, help="write a draft in the layout vLLM / SGLang / DeepSpec / ... load",
        description=para("Write a draft (any layout dspark reads) in the layout another engine loads: deepspec "
                         "(Qwen3DSparkModel), vllm (Qwen3DSparkModel, z-lab DFlash or EAGLE-3 with vLLM's layer "
                         "numbering), sglang (the same with SGLang's), speculators, or eagle3 (an official "
                         "EAGLE-3 release). The directory gets a README with the vLLM, vllm-ascend and SGLang "
                         "launch lines; --cost-profile adds the measured step costs as sps_table.json. "
                         "See docs/INTEROP.md."),
        epilog="examples:\n  dspark export --draft ./draft --format vllm --out ./draft-vllm --target ./Qwen3-8B\n"
               "  dspark export --draft ./eagle --format sglang --out ./eagle-sglang --cost-profile h100.yaml")
    export.add_argument("--draft", required=True, metavar="DIR", help="the draft to export (any supported layout)")
    export.add_argument("--format", required=True, choices=list(EXPORT_FORMATS))
    export.add_argument("--out", required=True, metavar="DIR")
    export.add_argument("--target", metavar="DIR", help="the target: needed when the draft does not store the "
                        "shared embedding / LM head, and names the verifier in speculators configs")
    export.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="weight dtype (auto: as the draft is stored, never losing bits)")
    export.add_argument("--cost-profile", metavar="FILE.yaml", help="a `dspark calibrate` profile to export as "
                        "sps_table.json")
    export.set_defaults(run=_cmd_export)
