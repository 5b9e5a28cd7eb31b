"""Interleaved A/B of the DSpark draft's sequential stage on SmolLM2 at batch 1, greedy: over the
full 49152-token vocabulary (how `propose` ran before commit 35bb49f: base logits and every Markov
bias spread over the target's vocabulary first) against over the draft's own 16384 columns (today),
with plain decoding beside them. One engine each, order rotating every repeat; prompts: the first of
each eval set, `--max-new-tokens` each. Prints tokens/s per repeat, the medians, the median time of
one proposal, and whether every output equals plain decoding. Results: docs/BENCHMARKS.md.

    python tools/ab_draft_sampler.py --repeats 3
"""
import argparse
import collections
import statistics
import time
import types

import dspark
from dspark.bench.harness import find_eval_dir, load_prompt_sets, rotated
from dspark.models.drafts.base import DraftProposal
from dspark.prompts import prompt_ids


def full_width_propose(self, anchor_ids, start_positions, slots, cache, backend, uniforms, temperature, top_k, top_p,
                       slot_range=None, ctx_len=None, **hints):
    """`DSparkDraft.propose` before 35bb49f: the sequential stage over the target's vocabulary."""
    hidden, base_logits = self.backbone(anchor_ids, start_positions, slots, cache, backend, slot_range, ctx_len)
    base_logits = self.full_vocab(base_logits, float("-inf")).float()
    step = self.markov_head.transition(hidden)

    def transition(k, prev_ids, state):
        bias, state = step(k, prev_ids, state)
        return self.full_vocab(bias, 0.0), state

    tokens, probs, prev_ids = backend.draft(base_logits, anchor_ids, uniforms, temperature, top_k, top_p, transition,
                                            **hints)
    return DraftProposal(tokens=tokens, probs=probs, confidence_logits=self.confidence_logits(hidden, prev_ids),
                         logits=base_logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", default="smollm2-dspark",
                        help="a DSpark draft with a Markov head and a reduced vocabulary")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()

    def engine(**options):
        return dspark.Engine.from_pretrained("smollm2-135m-instruct", backend="cpu", max_batch_size=1,
                                             max_model_len=1024, **options)

    engines = {"plain": engine(), "full width": engine(draft=args.draft, schedule="fixed"),
               "draft columns": engine(draft=args.draft, schedule="fixed")}
    old = engines["full width"].draft
    if old.markov_head is None or not old.config.reduced_vocab:
        parser.error(f"{args.draft} has no Markov head or no reduced vocabulary: both paths are the same")
    old.propose = types.MethodType(full_width_propose, old)
    seconds = collections.defaultdict(list)
    for key, e in engines.items():
        def timed(*a, _propose=e._propose, _key=key, **k):
            started = time.perf_counter()
            result = _propose(*a, **k)
            seconds[_key].append(time.perf_counter() - started)
            return result
        e._propose = timed
    prompts = [prompt_ids({"prompt": text}, engines["plain"].tokenizer)
               for texts in load_prompt_sets(find_eval_dir(), limit=1).values() for text in texts]
    params = dspark.SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    for e in engines.values():                                         # warm-up
        e.generate(prompts[:1], dspark.SamplingParams(max_new_tokens=8))
    seconds.clear()
    rates, outputs = collections.defaultdict(list), {}
    for repeat in range(args.repeats):
        for key, e in rotated(list(engines.items()), repeat):
            started = time.perf_counter()
            results = [e.generate([p], params)[0] for p in prompts]
            rates[key].append(sum(len(r.token_ids) for r in results) / (time.perf_counter() - started))
            outputs[key] = [r.token_ids for r in results]
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rates.items()),
              flush=True)
    base = statistics.median(rates["plain"])
    for key, runs in rates.items():
        proposal = f", one proposal {1000 * statistics.median(seconds[key]):.2f} ms" if seconds[key] else ""
        median = statistics.median(runs)
        print(f"{key:14s} median {median:5.2f} tokens/s ({median / base:.3f}x plain), "
              f"runs {[round(r, 2) for r in runs]}{proposal}")
    print("identical to plain decoding:", all(ids == outputs["plain"] for ids in outputs.values()))


if __name__ == "__main__":
    main()
