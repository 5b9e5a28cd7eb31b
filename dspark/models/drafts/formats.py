"""Draft checkpoints in the layouts other engines publish: detect, read, write.

A draft trained here should serve unchanged in vLLM, vllm-ascend and SGLang, and a draft
trained elsewhere should load here. Every layout is recognised from config.json alone
(never from the directory name) and converted to dspark's own representation: a config
dict that `DraftConfig.from_hf` reads, and weights under dspark's parameter names.

    layout          config.json says                                   weights
    deepspec        architectures Qwen3DSparkModel, top-level          layers.*, fc, hidden_norm, norm,
                    target_layer_ids (DeepSpec; vLLM's and SGLang's    markov_head.*, confidence_head.*
                    DSpark; dspark's own drafts)                       (+ embed_tokens, lm_head, d2t/t2d)
    dflash          DFlashDraftModel / DSparkDraftModel with           as deepspec, no embed_tokens /
                    dflash_config (z-lab, SpecForge): 1 + gamma        lm_head unless the vocabulary
                    queries, block_size = gamma + 1                    is reduced
    eagle3          LlamaForCausalLMEagle3 (or LlamaForCausalLM) with  midlayer.*, fc [d, 3d], norm,
                    draft_vocab_size, no layer ids (official release)  lm_head [Vd, d], d2t, t2d
    eagle3-sglang   ... with eagle_config.eagle_aux_hidden_state_layer_ids (SpecForge / SGLang)
    eagle3-vllm     ... with top-level eagle_aux_hidden_state_layer_ids (vLLM)
    speculators     speculators_model_type eagle3 | dflash | dspark,   layers.0.* (EAGLE-3) or as
                    nested transformer_layer_config                    deepspec, + embed_tokens, lm_head

Layer indices: two conventions are in use, and mixing them up silently costs several
percent of accepted length (the draft reads the neighbouring layer, which is similar
enough to still work). `LAYER_OUTPUT` ids name a layer's output (HF hidden_states[i + 1]);
`LAYER_INPUT` ids name a layer's input, the residual stream at boundary j (HF
hidden_states[j]). See `convert_layer_ids` and the table in docs/INTEROP.md.

What no layout carries (gamma for EAGLE-3, STS temperatures outside the DeepSpec layout, ...)
travels in a sidecar, `dspark.json`, which the engines never read.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ...errors import CheckpointError, ConfigError
from .config import DSPARK_ARCHITECTURE, DraftConfig

# ----------------------------------------------------------------------------- layer indices
LAYER_OUTPUT = "output"   # id i = output of decoder layer i = HF hidden_states[i + 1]; -1 = embedding output
LAYER_INPUT = "input"     # id j = input of decoder layer j = HF hidden_states[j];     0 = embedding output
CONVENTIONS = (LAYER_OUTPUT, LAYER_INPUT)

# Who uses which (checked against each project's source; docs/INTEROP.md cites them):
#   LAYER_OUTPUT  dspark target_layer_ids, DeepSpec and z-lab DFlash target_layer_ids
#                 (hidden_states[layer_id + 1]), SGLang eagle_config.eagle_aux_hidden_state_layer_ids
#                 (SGLang adds 1 itself before capturing)
#   LAYER_INPUT   the official EAGLE-3 code (captures the input of layers 2, L // 2, L - 3), vLLM
#                 eagle_aux_hidden_state_layer_ids (captured before layer j runs; vLLM adds 1 to
#                 DFlash ids itself), speculators aux_hidden_state_layer_ids


def hf_hidden_state_index(layer_id: int, convention: str) -> int:
    """The index into Hugging Face's `output_hidden_states` tuple that a layer id selects.
    Worked example (a 36-layer target): LAYER_OUTPUT 1 -> 2, LAYER_INPUT 2 -> 2, LAYER_OUTPUT -1 -> 0."""
    if convention == LAYER_OUTPUT:
        return int(layer_id) + 1
    if convention == LAYER_INPUT:
        return int(layer_id)
    raise ValueError(f"unknown layer-index convention {convention!r}; valid: {', '.join(CONVENTIONS)}")


def convert_layer_ids(ids: Sequence[int], source: str, dest: str, num_target_layers: Optional[int] = None) -> list:
    """Re-express layer ids from one convention in another; the tensors they select stay the same.
    With `num_target_layers`, ids are checked to name a boundary that engines capture: HF index
    0..L-1 (the embedding output up to the input of the last layer). HF index L is the last
    layer's output, which Hugging Face reports after the final norm while engines capture
    before it, so no convention can name it portably.
    Worked example: convert_layer_ids([1, 17, 32], LAYER_OUTPUT, LAYER_INPUT) == [2, 18, 33]."""
    indices = [hf_hidden_state_index(i, source) for i in ids]
    if num_target_layers is not None:
        bad = [i for i, h in zip(ids, indices) if not 0 <= h < num_target_layers]
        if bad:
            raise CheckpointError(f"layer ids {bad} ({source} convention) do not name a captured boundary of a "
                                  f"{num_target_layers}-layer target (HF hidden_states index 0..{num_target_layers - 1})")
    offset = 1 if dest == LAYER_OUTPUT else 0
    if dest not in CONVENTIONS:
        raise ValueError(f"unknown layer-index convention {dest!r}; valid: {', '.join(CONVENTIONS)}")
    return [h - offset for h in indices]


def eagle3_release_layer_ids(num_target_layers: int) -> list:
    """The layers the official EAGLE-3 code taps, which its releases do not write down: the
    inputs of layers 2, L // 2 and L - 3 (LAYER_INPUT). vLLM and SGLang use the same default
    when a draft names no layers. Llama-3.1-8B (32 layers) -> [2, 16, 29]."""
    return [2, num_target_layers // 2, num_target_layers - 3]


def zlab_default_layer_ids(num_target_layers: int, num_draft_layers: int) -> list:
    """z-lab DFlash's rule when dflash_config names no layers (LAYER_OUTPUT): one draft layer ->
    the middle layer; else num_draft_layers ids spread evenly from 1 to L - 3."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    return [int(round(start + i * (end - start) / (num_draft_layers - 1))) for i in range(num_draft_layers)]


# ----------------------------------------------------------------------------- layouts
LAYOUTS = {
    "deepspec": "DeepSpec Qwen3DSparkModel (also vLLM's and SGLang's DSpark, and dspark's own drafts)",
    "dflash": "z-lab DFlashDraftModel / SpecForge DSparkDraftModel (dflash_config; anchor + gamma mask queries)",
    "eagle3": "official EAGLE-3 release (midlayer.*, no layer ids: inputs of layers 2, L/2, L-3)",
    "eagle3-sglang": "SGLang / SpecForge LlamaForCausalLMEagle3 (eagle_config.eagle_aux_hidden_state_layer_ids)",
    "eagle3-vllm": "vLLM LlamaForCausalLMEagle3 (top-level eagle_aux_hidden_state_layer_ids)",
    "speculators": "vLLM speculators (Eagle3Speculator / DFlashSpeculator / DSparkSpeculator)",
}
DFLASH_ARCHITECTURES = ("DFlashDraftModel", "DSparkDraftModel")
EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")
SPECULATORS_KINDS = ("eagle3", "dflash", "dspark")
# Layouts we recognise but cannot run: say so by name instead of failing on a tensor shape.
UNSUPPORTED_ARCHITECTURES = {
    "Qwen3Eagle3Model": "DeepSpec's EAGLE-3 variant (q/k norms, several layers, five target layers)",
    "Gemma4Eagle3Model": "DeepSpec's Gemma 4 EAGLE-3 variant",
    "Gemma4DSparkModel": "DeepSpec's Gemma 4 DSpark variant",
}
SIDECAR = "dspark.json"           # what the published layouts cannot carry; engines never read it
SIDECAR_FIELDS = ("block_size", "num_anchors", "num_target_layers", "mask_token_id", "confidence_temperatures",
                  "confidence_temperatures_greedy", "embed_scale", "final_logit_softcapping")
# dspark's Markov-head parameters whose names differ from the published ones (same maths).
HEAD_RENAMES = {"markov_head.gate.": "markov_head.gate_proj.", "markov_head.rnn_proj.": "markov_head.joint_proj."}


def _native_architectures() -> set:
    from .base import DRAFT_ALGORITHMS

    return {a.architecture for a in DRAFT_ALGORITHMS.values()} | {DSPARK_ARCHITECTURE}


def detect_layout(hf: dict, source: str = "config.json") -> str:
    """Which published layout a draft's config.json is in. An unknown or inconsistent config
    is a CheckpointError that names the key at fault."""
    archs = hf.get("architectures") or []
    if not isinstance(archs, list):
        raise CheckpointError(f"{source}: 'architectures' must be a list of class names, got {archs!r}")
    names = set(archs)
    if "speculators_model_type" in hf:
        kind = hf["speculators_model_type"]
        if kind not in SPECULATORS_KINDS:
            raise CheckpointError(f"{source}: speculators_model_type {kind!r} is not supported "
                                  f"(supported: {', '.join(SPECULATORS_KINDS)})")
        if not isinstance(hf.get("transformer_layer_config"), dict):
            raise CheckpointError(f"{source}: a speculators config needs a 'transformer_layer_config' object")
        return "speculators"
    for name in names & set(UNSUPPORTED_ARCHITECTURES):
        raise CheckpointError(f"{source}: architectures {name!r} ({UNSUPPORTED_ARCHITECTURES[name]}) is not "
                              f"supported; supported layouts: {', '.join(LAYOUTS)}")
    if names & set(DFLASH_ARCHITECTURES):
        if not isinstance(hf.get("dflash_config"), dict):
            raise CheckpointError(f"{source}: architectures {archs} needs a 'dflash_config' object "
                                  "(target_layer_ids, mask_token_id)")
        return "dflash"
    looks_eagle3 = bool(names & set(EAGLE3_ARCHITECTURES)) or (
        "target_layer_ids" not in hf and "draft_vocab_size" in hf and hf.get("num_hidden_layers") == 1
        and (not archs or names <= {"LlamaForCausalLM"}))
    if looks_eagle3:
        if _eagle_config_ids(hf, source) is not None:
            return "eagle3-sglang"
        if hf.get("eagle_aux_hidden_state_layer_ids") is not None:
            return "eagle3-vllm"
        return "eagle3"
    if "target_layer_ids" in hf:
        if archs and not names & _native_architectures():
            raise CheckpointError(f"{source}: 'architectures' {archs} is not a draft class dspark knows "
                                  f"(known: {', '.join(sorted(_native_architectures()))}, "
                                  f"{', '.join(DFLASH_ARCHITECTURES + EAGLE3_ARCHITECTURES)})")
        return "deepspec"
    raise CheckpointError(f"{source} does not look like a draft (no target_layer_ids, dflash_config, "
                          f"draft_vocab_size or speculators_model_type; architectures={archs}). Did you pass the "
                          f"target directory as the draft? Draft layouts dspark reads: {', '.join(LAYOUTS)}")


def _eagle_config_ids(hf: dict, source: str):
    eagle_config = hf.get("eagle_config")
    if eagle_config is None:
        return None
    if not isinstance(eagle_config, dict):
        raise CheckpointError(f"{source}: 'eagle_config' must be an object, got {eagle_config!r}")
    return eagle_config.get("eagle_aux_hidden_state_layer_ids")


# ----------------------------------------------------------------------------- reading
def import_draft(directory: Path, hf: dict, weights: dict, target_cfg=None) -> tuple:
    """Convert a draft directory's config.json and tensors, in any supported layout, to
    dspark's: returns (layout name, config dict for `DraftConfig.from_hf`, weights by dspark
    name). `target_cfg` supplies what a layout leaves to the target (an official EAGLE-3
    release names no layers); None works for every layout that writes its layers down."""
    source = str(Path(directory) / "config.json")
    layout = detect_layout(hf, source)
    sidecar = _read_sidecar(Path(directory)) if layout != "deepspec" else {}
    reader = {"deepspec": _read_deepspec, "dflash": _read_dflash, "speculators": _read_speculators}.get(
        layout, _read_eagle3)
    config, weights = reader(hf, dict(weights), target_cfg, source, layout)
    for key in SIDECAR_FIELDS:          # fields the layout does not carry, from our sidecar
        if key in sidecar and key not in config:
            config[key] = sidecar[key]
    if config.get("dspark_algorithm") == "eagle3":
        # EAGLE-3 has no mask token; DraftConfig wants a valid id, and the chain never reads it.
        config.setdefault("mask_token_id", int(config["vocab_size"]) - 1)
    _settle_vocab_maps(config, weights, source)
    return layout, config, weights


def _read_sidecar(directory: Path) -> dict:
    path = directory / SIDECAR
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); delete it to load the draft without it") from None
    return data.get("draft_config", {}) if isinstance(data, dict) else {}


def _rename(weights: dict, renames: dict) -> dict:
    out = {}
    for name, tensor in weights.items():
        for old, new in renames.items():
            if name.startswith(old):
                name = new + name[len(old):]
                break
        out[name] = tensor
    return out


def _native_heads(weights: dict) -> dict:
    return _rename(weights, {new: old for old, new in HEAD_RENAMES.items()})


def _require(mapping: dict, key: str, source: str, where: str = ""):
    if key not in mapping or mapping[key] is None:
        raise CheckpointError(f"{source}: {where}{key!r} is missing")
    return mapping[key]


def _check_plain_attention(hf: dict, source: str, prefix: str = "") -> None:
    """dspark's draft layers are full, bias-free attention: refuse the variants they are not."""
    if hf.get("attention_bias"):
        raise CheckpointError(f"{source}: {prefix}attention_bias=true is not supported (dspark drafts have no "
                              "attention biases)")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise CheckpointError(f"{source}: {prefix}layer_types {layer_types} has sliding-window layers, which "
                              "dspark drafts do not support")


def _backbone_fields(hf: dict, source: str, prefix: str = "") -> dict:
    """Sizes and RoPE of the draft's decoder layers, from an HF-style (sub)config."""
    fields = {key: _require(hf, key, source, prefix) for key in
              ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")}
    for key in ("num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "rope_scaling", "rope_theta"):
        if hf.get(key) is not None:
            fields[key] = hf[key]
    return fields


def _read_deepspec(hf, weights, target_cfg, source, layout):
    config = dict(hf)
    # DeepSpec's blocks are always anchor-first, its dflash_* drafts included (markov_rank 0,
    # no confidence head); only dspark's own files say otherwise, and they say it explicitly.
    config.setdefault("anchor_as_first", True)
    return config, _native_heads(weights)


def _read_dflash(hf, weights, target_cfg, source, layout):
    """z-lab DFlash (DFlashDraftModel) and SpecForge DSpark (DSparkDraftModel): block =
    [anchor, MASK x (B - 1)], query k predicts the token at anchor + k, so gamma = B - 1
    (unless sample_from_anchor says the anchor's query predicts too)."""
    dflash = hf["dflash_config"]
    _check_plain_attention(hf, source)
    if dflash.get("causal"):
        raise CheckpointError(f"{source}: dflash_config.causal=true is not supported (dspark blocks are "
                              "bidirectional)")
    projector = dflash.get("projector_type")
    if projector not in (None, "dspark"):
        raise CheckpointError(f"{source}: dflash_config.projector_type {projector!r} is not supported "
                              "(supported: none for DFlash, 'dspark')")
    block = hf.get("block_size") or dflash.get("block_size")
    if not block:
        raise CheckpointError(f"{source}: 'block_size' is missing (checked the top level and dflash_config)")
    from_anchor = bool(dflash.get("sample_from_anchor", hf.get("sample_from_anchor", False)))
    num_layers = int(_require(hf, "num_hidden_layers", source))
    num_target_layers = hf.get("num_target_layers") or (target_cfg.num_layers if target_cfg is not None else None)
    layer_ids = dflash.get("target_layer_ids")
    if layer_ids is None:
        if num_target_layers is None:
            raise CheckpointError(f"{source}: dflash_config.target_layer_ids is missing and so is "
                                  "num_target_layers; load the draft together with its target")
        layer_ids = zlab_default_layer_ids(int(num_target_layers), num_layers)
    markov_rank = int(dflash.get("markov_rank", 0) or 0)
    confidence = bool(dflash.get("enable_confidence_head", float(dflash.get("confidence_head_alpha", 0) or 0) > 0))
    config = _backbone_fields(hf, source)
    config.update(
        dspark_algorithm="dspark" if markov_rank > 0 or confidence else "dflash",
        target_layer_ids=[int(i) for i in layer_ids],                     # LAYER_OUTPUT, as ours
        mask_token_id=_require(dflash, "mask_token_id", source, "dflash_config."),
        block_size=int(block) if from_anchor else int(block) - 1,
        anchor_as_first=from_anchor, markov_rank=markov_rank,
        markov_head_type=dflash.get("markov_head_type", "vanilla"), enable_confidence_head=confidence,
        confidence_head_with_markov=bool(dflash.get("confidence_head_with_markov", False)))
    if num_target_layers is not None:
        config["num_target_layers"] = int(num_target_layers)
    if hf.get("draft_vocab_size") is not None:
        config["draft_vocab_size"] = int(hf["draft_vocab_size"])
    return config, _native_heads(weights)


def _read_eagle3(hf, weights, target_cfg, source, layout):
    """Official EAGLE-3 releases and the SGLang / vLLM variants of the same checkpoint."""
    if hf.get("num_hidden_layers", 1) != 1:
        raise CheckpointError(f"{source}: num_hidden_layers={hf['num_hidden_layers']}; an EAGLE-3 draft has "
                              "exactly one layer (midlayer)")
    _check_plain_attention(hf, source)
    fields = _backbone_fields(hf, source)
    layer_ids = _eagle3_layer_ids(hf, target_cfg, source)
    return _eagle3_config(fields, hf, layer_ids, target_cfg, source), \
        _rename(weights, {"layers.0.": "midlayer.", "model.layers.0.": "midlayer.", "model.midlayer.": "midlayer."})


def _eagle3_layer_ids(hf, target_cfg, source) -> list:
    """EAGLE-3 layer ids in dspark's convention. Two ways of writing them down exist, in
    opposite conventions; a config that carries both must agree with itself."""
    num_layers = target_cfg.num_layers if target_cfg is not None else None
    candidates = []
    sglang_ids = _eagle_config_ids(hf, source)
    if sglang_ids is not None:
        candidates.append(("eagle_config.eagle_aux_hidden_state_layer_ids",
                           convert_layer_ids(sglang_ids, LAYER_OUTPUT, LAYER_OUTPUT)))
    if hf.get("eagle_aux_hidden_state_layer_ids") is not None:
        candidates.append(("eagle_aux_hidden_state_layer_ids",
                           convert_layer_ids(hf["eagle_aux_hidden_state_layer_ids"], LAYER_INPUT, LAYER_OUTPUT,
                                             num_layers)))
    if len(candidates) == 2 and candidates[0][1] != candidates[1][1]:
        raise CheckpointError(f"{source}: eagle_config.eagle_aux_hidden_state_layer_ids {sglang_ids} (layer "
                              f"outputs, SGLang) and eagle_aux_hidden_state_layer_ids "
                              f"{hf['eagle_aux_hidden_state_layer_ids']} (layer inputs, vLLM) name different "
                              "layers; fix or remove one of them")
    if candidates:
        key, ids = candidates[0]
    else:
        if num_layers is None:
            raise CheckpointError(f"{source} is an official EAGLE-3 release: it names no target layers (the "
                                  "EAGLE-3 code taps the inputs of layers 2, L/2 and L-3 of an L-layer target); "
                                  "load it together with its target")
        key, ids = "the EAGLE-3 default", convert_layer_ids(eagle3_release_layer_ids(num_layers), LAYER_INPUT,
                                                           LAYER_OUTPUT, num_layers)
    if len(ids) != 3:
        raise CheckpointError(f"{source}: {key} names {len(ids)} layers; an EAGLE-3 draft fuses exactly 3")
    return ids


def _eagle3_config(fields: dict, hf: dict, layer_ids: list, target_cfg, source: str) -> dict:
    hidden = int(fields["hidden_size"])
    target_hidden = hf.get("target_hidden_size")
    if target_hidden is not None and int(target_hidden) != hidden:
        raise CheckpointError(f"{source}: target_hidden_size {target_hidden} != hidden_size {hidden}; dspark's "
                              "EAGLE-3 drafts work at the target's width")
    config = dict(fields)
    config.update(dspark_algorithm="eagle3", target_layer_ids=layer_ids, markov_rank=0,
                  enable_confidence_head=False, confidence_head_with_markov=False, anchor_as_first=True)
    if hf.get("draft_vocab_size") is not None:
        config["draft_vocab_size"] = int(hf["draft_vocab_size"])
    if target_cfg is not None:
        config["num_target_layers"] = target_cfg.num_layers
    # max_position_embeddings (2048 in the official releases) is not used: RoPE is computed for
    # any position, and the draft serves the target's context length.
    return config


def _read_speculators(hf, weights, target_cfg, source, layout):
    kind = hf["speculators_model_type"]
    layer = hf["transformer_layer_config"]
    prefix = "transformer_layer_config."
    _check_plain_attention(layer, source, prefix)
    weights = {k: v for k, v in weights.items() if not k.startswith(("verifier_lm_head.", "verifier_norm."))}
    fields = _backbone_fields(layer, source, prefix)
    if hf.get("draft_vocab_size") is not None:
        fields["draft_vocab_size"] = int(hf["draft_vocab_size"])
    if kind == "eagle3":
        if layer.get("model_type", "llama") != "llama":
            raise CheckpointError(f"{source}: {prefix}model_type {layer.get('model_type')!r} is not supported for "
                                  "EAGLE-3 (dspark's EAGLE-3 layer is Llama's: no q/k norms)")
        for flag in ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output"):
            if hf.get(flag):
                raise CheckpointError(f"{source}: {flag}=true is not supported (dspark's EAGLE-3 layer follows the "
                                      "original release)")
        if int(fields["num_hidden_layers"]) != 1:
            raise CheckpointError(f"{source}: {prefix}num_hidden_layers={fields['num_hidden_layers']}; an EAGLE-3 "
                                  "draft has exactly one layer")
        layer_ids = _eagle3_layer_ids({"eagle_aux_hidden_state_layer_ids": hf.get("eagle_aux_hidden_state_layer_ids")},
                                      target_cfg, source)
        config = _eagle3_config(fields, hf, layer_ids, target_cfg, source)
        return config, _rename(weights, {"layers.0.": "midlayer."})
    ids = _require(hf, "aux_hidden_state_layer_ids", source)
    from_anchor = bool(hf.get("sample_from_anchor", kind == "dspark"))
    block = int(_require(hf, "block_size", source))
    confidence = bool(hf.get("enable_confidence_head", kind == "dspark"))
    markov_rank = int(hf.get("markov_rank", 256 if kind == "dspark" else 0) or 0)
    config = dict(fields)
    config.update(
        dspark_algorithm="dspark" if markov_rank > 0 or confidence else "dflash",
        target_layer_ids=convert_layer_ids(ids, LAYER_INPUT, LAYER_OUTPUT,
                                           target_cfg.num_layers if target_cfg is not None else None),
        mask_token_id=_require(hf, "mask_token_id", source), block_size=block if from_anchor else block - 1,
        anchor_as_first=from_anchor, markov_rank=markov_rank, markov_head_type=hf.get("markov_head_type", "vanilla"),
        enable_confidence_head=confidence,
        confidence_head_with_markov=bool(hf.get("confidence_head_with_markov", kind == "dspark")) and confidence)
    if target_cfg is not None:
        config["num_target_layers"] = target_cfg.num_layers
    return config, _native_heads(weights)


def _settle_vocab_maps(config: dict, weights: dict, source: str) -> None:
    """Reconcile d2t / t2d with draft_vocab_size. A full-vocabulary draft carries no maps
    (identity maps some layouts always write are dropped; any other is an error); a reduced
    one needs d2t, and t2d is rebuilt from it when a layout leaves it out (vLLM skips it)."""
    vocab = int(config["vocab_size"])
    draft_vocab = int(config.get("draft_vocab_size") or vocab)
    if draft_vocab > vocab:
        raise CheckpointError(f"{source}: draft_vocab_size {draft_vocab} > vocab_size {vocab}")
    if draft_vocab == vocab:
        d2t, t2d = weights.pop("d2t", None), weights.pop("t2d", None)
        if (d2t is not None and bool(d2t.ne(0).any())) or (t2d is not None and not bool(t2d.all())):
            raise CheckpointError(f"{source}: d2t / t2d map the full vocabulary ({vocab} tokens) onto itself "
                                  "non-trivially; set draft_vocab_size to the number of draft tokens")
        config.pop("draft_vocab_size", None)
        return
    if "d2t" not in weights:
        raise CheckpointError(f"{source}: draft_vocab_size {draft_vocab} < vocab_size {vocab} but the weights have "
                              "no d2t tensor (target id = draft id + d2t[draft id])")
    weights["d2t"] = weights["d2t"].to(torch.long)
    if "t2d" not in weights:
        t2d = torch.zeros(vocab, dtype=torch.bool)
        t2d[torch.arange(draft_vocab) + weights["d2t"]] = True
        weights["t2d"] = t2d
    weights["t2d"] = weights["t2d"].to(torch.bool)


# ----------------------------------------------------------------------------- writing
EXPORT_FORMATS = ("deepspec", "vllm", "sglang", "speculators", "eagle3")


@dataclass
class ExportedDraft:
    """A draft in an engine's layout: what goes into config.json and model.safetensors, and
    how that engine is told to use it."""
    format: str
    layout: str                              # one of LAYOUTS (what dspark detects when reading it back)
    config: dict
    weights: dict                            # name -> tensor, in the layout's names
    launch: dict = field(default_factory=dict)   # engine -> command line (placeholders <target>, <draft>)
    notes: list = field(default_factory=list)


def export_draft(model: torch.nn.Module, fmt: str, base: Optional[dict] = None,
                 verifier: Optional[dict] = None) -> ExportedDraft:
    """Express a loaded draft (embedding and LM head filled in) in an engine's layout.
    `base`: the draft's own config.json (the target's text fields travel on: eos, context
    length); `verifier`: {"name_or_path", "architectures"} of the target, for speculators.
    A draft the layout cannot express (a reduced vocabulary in DeepSpec's, an anchor-first
    DFlash in z-lab's, ...) is a ConfigError that says which format can."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; valid: {', '.join(EXPORT_FORMATS)}")
    cfg: DraftConfig = model.config
    base = {k: v for k, v in (base or {}).items() if k not in ("architectures", "auto_map")}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    family = "eagle3" if cfg.algorithm == "eagle3" else ("anchor-first" if cfg.anchor_as_first else "anchor+masks")
    if fmt == "speculators":
        return _write_speculators(cfg, state, base, verifier or {})
    if family == "eagle3":
        if fmt == "deepspec":
            on_release_layers = convert_layer_ids(cfg.target_layer_ids, LAYER_OUTPUT, LAYER_INPUT) == \
                eagle3_release_layer_ids(cfg.num_target_layers)
            raise ConfigError("DeepSpec's EAGLE-3 (Qwen3Eagle3Model) is a different architecture (q/k norms, five "
                              "target layers); export this EAGLE-3 draft with --format "
                              f"{'eagle3, ' if on_release_layers else ''}vllm, sglang or speculators")
        return _write_eagle3(cfg, state, base, fmt)
    if fmt == "vllm" and cfg.markov_rank > 0 and cfg.markov_head_type != "vanilla":
        raise ConfigError(f"vLLM's Qwen3DSparkModel has only the vanilla Markov head (markov_w1, markov_w2); this "
                          f"draft's markov_head_type is {cfg.markov_head_type!r}: export with --format deepspec or "
                          "speculators")
    if fmt in ("deepspec", "vllm", "sglang") and family == "anchor-first":
        if fmt == "sglang" and cfg.markov_rank <= 0:
            raise ConfigError("SGLang's DSPARK needs a Markov head (markov_rank > 0); this anchor-first DFlash draft "
                              "can be exported with --format deepspec, vllm or speculators")
        if cfg.reduced_vocab and fmt != "vllm":
            raise ConfigError(f"the {fmt} DSpark layout has no reduced draft vocabulary (d2t / t2d); export with "
                              "--format vllm or speculators, or train with the full vocabulary")
        return _write_deepspec(cfg, state, base, fmt)
    if fmt in ("vllm", "sglang") and family == "anchor+masks" and cfg.markov_rank <= 0 \
            and not cfg.enable_confidence_head:
        if cfg.reduced_vocab and fmt == "sglang":
            raise ConfigError("SGLang's DFLASH shares the target's LM head (no reduced draft vocabulary); export "
                              "with --format vllm or speculators")
        return _write_dflash(cfg, state, base, fmt)
    if family == "anchor+masks":     # z-lab's layout (vLLM, SGLang) holds plain DFlash drafts only
        plain = cfg.markov_rank <= 0 and not cfg.enable_confidence_head
        hint = ("vllm or speculators" if cfg.reduced_vocab else "vllm, sglang or speculators") if plain \
            else "speculators"
    else:                        # DeepSpec's layout has no reduced vocabulary
        hint = "vllm or speculators" if cfg.reduced_vocab else "deepspec, vllm or speculators"
    raise ConfigError(f"the {fmt} layout cannot express a {cfg.algorithm} draft with "
                      f"{'an anchor + mask' if family == 'anchor+masks' else 'an anchor-first'} block"
                      f"{' and a Markov / confidence head' if cfg.markov_rank > 0 else ''}; use --format {hint}")


def _external_heads(state: dict) -> dict:
    return _rename(state, HEAD_RENAMES)


def _without(state: dict, *names: str) -> dict:
    return {k: v for k, v in state.items() if k not in names}


def _rope_fields(cfg: DraftConfig) -> dict:
    """RoPE written both ways: rope_theta / rope_scaling (what vLLM, SGLang and transformers 4
    read) and rope_parameters (transformers 5)."""
    rope = cfg.rope
    params = {"rope_theta": rope.theta, "rope_type": rope.type}
    if rope.type != "default":
        params.update(factor=rope.factor)
    if rope.type == "llama3":
        params.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                      original_max_position_embeddings=rope.original_max_position_embeddings)
    scaling = {k: v for k, v in params.items() if k != "rope_theta"} if rope.type != "default" else None
    return {"rope_theta": rope.theta, "rope_scaling": scaling, "rope_parameters": params}


def _layer_fields(cfg: DraftConfig, base: dict, num_layers: int, model_type: str) -> dict:
    """An HF config for the draft's decoder layers: sizes, norms, RoPE, and the target's
    context length and special tokens (never the 2048 of the EAGLE-3 releases)."""
    fields = {key: base[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")
              if key in base}
    fields.update(model_type=model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                  intermediate_size=cfg.intermediate_size, num_hidden_layers=num_layers,
                  num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                  rms_norm_eps=cfg.rms_norm_eps, hidden_act="silu", attention_bias=False,
                  tie_word_embeddings=False, **_rope_fields(cfg))
    if model_type == "qwen3":
        fields["layer_types"] = ["full_attention"] * num_layers
    return fields


def _vocab_maps(cfg: DraftConfig, state: dict, always: bool = False) -> dict:
    """d2t / t2d as the layout wants them: for a reduced vocabulary, or (official EAGLE-3,
    which always registers them) as identity maps over the full vocabulary."""
    if cfg.reduced_vocab:
        return {"d2t": state["d2t"], "t2d": state["t2d"]}
    if always:
        return {"d2t": torch.zeros(cfg.vocab_size, dtype=torch.long), "t2d": torch.ones(cfg.vocab_size, dtype=torch.bool)}
    return {}


def _vllm_line(method: str, gamma: int, extra: Optional[dict] = None) -> str:
    spec = {"method": method, "model": "<draft>", "num_speculative_tokens": gamma, **(extra or {})}
    return f"vllm serve <target> --speculative-config '{json.dumps(spec)}'"


def _sglang_line(*flags: str) -> str:
    return " ".join(["python -m sglang.launch_server --model-path <target>", *flags,
                     "--speculative-draft-model-path <draft>"])


def _write_deepspec(cfg: DraftConfig, state: dict, base: dict, fmt: str) -> ExportedDraft:
    """Qwen3DSparkModel: DeepSpec's class, which vLLM ('dspark') and SGLang (DSPARK) load too.
    target_layer_ids stay in LAYER_OUTPUT; both engines add 1 themselves."""
    config = cfg.to_hf(base)
    config.update(architectures=[DSPARK_ARCHITECTURE], tie_word_embeddings=False)
    gamma = cfg.block_size
    extra = {"enable_adaptive_verification": True} if cfg.enable_confidence_head else None
    launch = {"vllm": _vllm_line("dspark", gamma, extra)}
    if not cfg.reduced_vocab and cfg.markov_rank > 0:     # what SGLang's DSPARK loads
        launch["sglang"] = _sglang_line("--speculative-algorithm DSPARK", f"--speculative-dspark-block-size {gamma}")
    if fmt == "deepspec":
        launch = {"deepspec": "python eval.py ... (DeepSpec's evaluator loads Qwen3DSparkModel from the directory)",
                  **launch}
    return ExportedDraft(fmt, "deepspec", config, _external_heads(state), launch)


def _write_dflash(cfg: DraftConfig, state: dict, base: dict, fmt: str) -> ExportedDraft:
    """z-lab's DFlashDraftModel: block_size counts the anchor's query too (gamma + 1), the
    embedding and LM head are the target's and are left out."""
    config = _layer_fields(cfg, base, cfg.num_layers, "qwen3")
    config.update(architectures=["DFlashDraftModel"], block_size=cfg.block_size + 1,
                  num_target_layers=cfg.num_target_layers,
                  dflash_config={"target_layer_ids": list(cfg.target_layer_ids), "mask_token_id": cfg.mask_token_id})
    weights = _without(state, "embed_tokens.weight", "lm_head.weight", "d2t", "t2d")
    if cfg.reduced_vocab:        # vLLM's DFlash reads a reduced LM head and d2t
        config["draft_vocab_size"] = cfg.draft_vocab_size
        weights.update({"lm_head.weight": state["lm_head.weight"], **_vocab_maps(cfg, state)})
    gamma = cfg.block_size
    launch = {"vllm": _vllm_line("dflash", gamma)}
    if not cfg.reduced_vocab:           # SGLang's DFLASH uses the target's LM head
        launch["sglang"] = _sglang_line("--speculative-algorithm DFLASH",
                                        f"--speculative-num-draft-tokens {gamma + 1}")
    return ExportedDraft(fmt, "dflash", config, weights, launch)


def _write_eagle3(cfg: DraftConfig, state: dict, base: dict, fmt: str) -> ExportedDraft:
    """LlamaForCausalLMEagle3 with midlayer.* names and no embedding. The layers it reads are
    written in the convention of the engine that reads them: LAYER_INPUT for vLLM, LAYER_OUTPUT
    (inside eagle_config) for SGLang, and not at all for the official release, which can only
    express the default layers."""
    config = _layer_fields(cfg, base, 1, "llama")
    config.update(architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=cfg.output_size,
                  target_hidden_size=cfg.hidden_size)
    layer_ids = list(cfg.target_layer_ids)
    input_ids = convert_layer_ids(layer_ids, LAYER_OUTPUT, LAYER_INPUT, cfg.num_target_layers)
    gamma = cfg.block_size
    sglang = _sglang_line("--speculative-algorithm EAGLE3", f"--speculative-num-steps {gamma}",
                          "--speculative-eagle-topk 1", f"--speculative-num-draft-tokens {gamma + 1}")
    if fmt == "eagle3":
        release = eagle3_release_layer_ids(cfg.num_target_layers)
        if input_ids != release:
            raise ConfigError(f"this EAGLE-3 draft reads target layers {layer_ids} (layer outputs), but an official "
                              f"EAGLE-3 release cannot name layers: its code always taps the inputs of layers "
                              f"{release}; export with --format vllm or sglang, which write the layers down")
        layout, launch = "eagle3", {"vllm": _vllm_line("eagle3", gamma), "sglang": sglang,
                                    "eagle": "EaModel.from_pretrained(base_model_path=<target>, ea_model_path=<draft>)"}
    elif fmt == "vllm":
        config["eagle_aux_hidden_state_layer_ids"] = input_ids
        layout, launch = "eagle3-vllm", {"vllm": _vllm_line("eagle3", gamma)}
    else:
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": layer_ids, "use_aux_hidden_state": True}
        layout, launch = "eagle3-sglang", {"sglang": sglang}
    weights = {**_without(state, "embed_tokens.weight", "d2t", "t2d"), **_vocab_maps(cfg, state, fmt == "eagle3")}
    return ExportedDraft(fmt, layout, config, weights, launch)


def _write_speculators(cfg: DraftConfig, state: dict, base: dict, verifier: dict) -> ExportedDraft:
    """The speculators library's layout: a nested transformer_layer_config, a
    speculators_config naming the verifier, aux layer ids in LAYER_INPUT, and the embedding
    and LM head stored (the library loads them from the file)."""
    gamma = cfg.block_size
    input_ids = convert_layer_ids(cfg.target_layer_ids, LAYER_OUTPUT, LAYER_INPUT, cfg.num_target_layers)
    kind = cfg.algorithm if cfg.algorithm in SPECULATORS_KINDS else "dspark"
    proposal = {"proposal_type": "greedy", "speculative_tokens": gamma, "verifier_accept_k": 1, "accept_tolerance": 0.0}
    config = {"architectures": [{"eagle3": "Eagle3Speculator", "dflash": "DFlashSpeculator",
                                 "dspark": "DSparkSpeculator"}[kind]],
              "speculators_model_type": kind, "speculators_version": "dspark-export",
              "draft_vocab_size": cfg.output_size, "target_hidden_size": cfg.hidden_size,
              "speculators_config": {"algorithm": kind, "proposal_methods": [proposal],
                                     "default_proposal_method": "greedy",
                                     "verifier": {"name_or_path": verifier.get("name_or_path"),
                                                  "architectures": list(verifier.get("architectures") or [])}}}
    maps = _vocab_maps(cfg, state)
    if kind == "eagle3":
        config.update(transformer_layer_config=_layer_fields(cfg, base, 1, "llama"),
                      eagle_aux_hidden_state_layer_ids=input_ids, norm_before_residual=False)
        weights = {**_rename(_without(state, "d2t", "t2d"), {"midlayer.": "layers.0."}), **maps}
    else:
        config.update(transformer_layer_config=_layer_fields(cfg, base, cfg.num_layers, "qwen3"),
                      block_size=gamma if cfg.anchor_as_first else gamma + 1, aux_hidden_state_layer_ids=input_ids,
                      mask_token_id=cfg.mask_token_id, sample_from_anchor=cfg.anchor_as_first)
        if kind == "dspark":
            config.update(markov_rank=cfg.markov_rank, markov_head_type=cfg.markov_head_type,
                          enable_confidence_head=cfg.enable_confidence_head,
                          confidence_head_with_markov=cfg.confidence_head_with_markov)
        weights = {**_external_heads(_without(state, "d2t", "t2d")), **maps}
    launch = {"vllm": _vllm_line(kind, gamma)}
    return ExportedDraft("speculators", "speculators", config, weights, launch)


def sidecar_for(cfg: DraftConfig) -> dict:
    """The sidecar's content: the draft's fields that a layout may not carry."""
    native = cfg.to_hf()
    return {"format": "dspark.draft-sidecar/1", "draft_config": {k: native.get(k) for k in SIDECAR_FIELDS
                                                                if native.get(k) is not None}}


__all__ = ["CONVENTIONS", "EXPORT_FORMATS", "ExportedDraft", "LAYER_INPUT", "LAYER_OUTPUT", "LAYOUTS", "SIDECAR",
           "convert_layer_ids", "detect_layout", "eagle3_release_layer_ids", "export_draft", "hf_hidden_state_index",
           "import_draft", "sidecar_for", "zlab_default_layer_ids"]
