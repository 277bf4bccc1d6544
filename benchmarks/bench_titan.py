"""ERNIE 3.0 Titan, measured: controllability with and without prompts, credibility reranking, and online
distillation's students against their teacher.

Stages (each an ordinary engine run of a config in configs/ernie_titan/, shortened by -o overrides):
  1. pretrain tiny.yaml (every Titan task at once);
  2. fine-tune tiny_nlu.yaml from it: the topic classifier (six stdlib packages) that judges topic control;
  3. controllability: for windows of the classifier's validation files (never trained on by it), generate with
     the prompt `[t]package[/t] [k]kw0, kw1[/k] [w]About L words[/w]` + the code genre's soft prompt, and with
     no prompt; keyword inclusion (share of the two keywords that appear), length error (|words - L| / L) and
     topic accuracy (the classifier on the generated text) side by side;
  4. credibility reranking: N sampled continuations of 1-3 sentence prefixes of validation chunks; the first
     sample (no reranking), the mean sample and the one the discriminator ranks first, by discriminator
     P(original) and by perplexity under the generation module; the real continuation for reference;
  5. distill tiny_distill.yaml (teacher, assistant and two students in one run): validation MLM loss of each
     (learners without their ALD layer), parameters and forward time against the teacher (best of rounds,
     engines alternating).

    python benchmarks/bench_titan.py [--steps 200] [--nlu-steps 100] [--distill-steps 200] [--out DIR]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ppzoo  # noqa: E402  (first: CPU threading defaults)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from ppzoo.core import Engine  # noqa: E402
from ppzoo.core import checkpoint as ckpt  # noqa: E402
from ppzoo.data.ernie_tasks import (  # noqa: E402
    GENRES, TOPIC_CLASSES, ErnieTitanTasks, ErnieTitanTasksConfig, TitanTopics, TitanTopicsConfig, count_words,
    extract_keywords, keyword_candidates, rounded_length,
)
from ppzoo.inference import SamplingConfig, load_checkpoint_for_inference  # noqa: E402
from ppzoo.methods.distill import OnlineDistillModule  # noqa: E402
from ppzoo.models.ernie_titan import (  # noqa: E402
    continuation_log_likelihood, controllable_generate, credibility_scores, sample_continuations,
)

REPO = Path(__file__).resolve().parents[1]


def table(title, header, rows):
    print(f"\n{title}")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |")


def train(config, out_dir, overrides, steps):
    """Train (or reuse a finished run in out_dir) -> (checkpoint path, summary)."""
    existing = ckpt.list_checkpoints(str(out_dir)) if Path(out_dir).is_dir() else []
    if existing:
        print(f"reusing {existing[-1]}")
        return existing[-1], {}
    cfg = ppzoo.load_config(REPO / config, [f"Engine.output_dir={out_dir}", f"Engine.max_steps={steps}",
                                            f"Engine.save_steps={steps}", "Engine.progress_bar=false"] + overrides)
    started = time.perf_counter()
    summary = Engine(cfg).fit()
    print(f"{config}: {steps} steps in {time.perf_counter() - started:.0f} s, final {json.dumps(summary)}")
    return summary["checkpoint"], summary


def controllability(titan, classifier, tokenizer, per_class, max_new_tokens, seed):
    lm = titan.language_model()
    eval_topics = TitanTopics.build(TitanTopicsConfig(split="validation", max_per_class=per_class, seed=seed),
                                    tokenizer, 96)
    windows = [(tokenizer.decode(ids[:48]), label) for ids, label in eval_topics.samples]
    frequency = Counter()
    for text, _ in windows:
        frequency.update(set(keyword_candidates(text)))
    cls_id = tokenizer.token_to_id("[CLS]")
    results = {}
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.7, top_k=20, seed=seed,
                              repetition_penalty=1.1)
    for condition in ("no prompt", "prompt"):
        kw_hits, kw_total, length_errors, correct = 0, 0, [], 0
        for text, label in windows:
            keywords = extract_keywords(text, frequency, len(windows))
            length = rounded_length(count_words(text))
            if condition == "prompt":
                out = controllable_generate(lm, tokenizer, topic=TOPIC_CLASSES[label], keywords=keywords, length=length,
                                            genre=GENRES.index("code"), sampling=sampling)[0]["text"]
            else:
                out = controllable_generate(lm, tokenizer, sampling=sampling)[0]["text"]
            kw_hits += sum(k in out for k in keywords)
            kw_total += len(keywords)
            length_errors.append(abs(count_words(out) - length) / length)
            ids = [cls_id] + tokenizer.encode(out)[:95]
            with paddle.no_grad():
                logits = classifier.logits(paddle.to_tensor([ids]), paddle.ones([1, len(ids)], dtype="bool"))
            correct += int(int(logits.argmax(-1)[0]) == label)
        results[condition] = (kw_hits / max(kw_total, 1), float(np.mean(length_errors)), correct / len(windows))
    return results, len(windows)


def reranking(titan, tokenizer, num_prefixes, num_candidates, new_tokens, seed):
    lm = titan.language_model()
    model = titan.model
    data = ErnieTitanTasks.build(ErnieTitanTasksConfig(split="validation", max_chars=300_000, seed=seed), tokenizer, 96)
    cls_id = tokenizer.token_to_id("[CLS]")
    rows = {"first sample (no reranking)": [], "mean of the samples": [], "reranked (discriminator's best)": [],
            "real continuation": []}
    step = max(1, len(data) // num_prefixes)
    for n in range(num_prefixes):
        sample = data[n * step]
        prefix = [int(t) for t in sample["adv_ids"][1:1 + int(sample["adv_prefix_len"])]]
        real = [int(t) for t in sample["adv_ids"][1 + len(prefix):int(sample["adv_length"])]][:new_tokens]
        if len(real) < new_tokens // 2:
            continue
        candidates = sample_continuations(lm, [prefix] * num_candidates, new_tokens, temperature=1.0, top_k=20,
                                          seed=seed + n)
        scores = credibility_scores(model, [prefix + c for c in candidates], cls_id, tokenizer.pad_id or 0)
        ppl = [math.exp(-ll / max(k, 1)) for ll, k in (continuation_log_likelihood(lm, prefix, c) for c in candidates)]
        best = int(np.argmax(scores))
        rows["first sample (no reranking)"].append((scores[0], ppl[0]))
        rows["mean of the samples"].append((float(np.mean(scores)), float(np.mean(ppl))))
        rows["reranked (discriminator's best)"].append((scores[best], ppl[best]))
        real_score = credibility_scores(model, [prefix + real], cls_id, tokenizer.pad_id or 0)[0]
        ll, k = continuation_log_likelihood(lm, prefix, real)
        rows["real continuation"].append((real_score, math.exp(-ll / k)))
    return {name: (float(np.mean([v[0] for v in values])), float(np.median([v[1] for v in values])))
            for name, values in rows.items()}, len(rows["real continuation"])


def understanding_params(module):
    m = module.teacher
    return sum(int(np.prod(p.shape)) for layer in (m.embed, m.universal, m.to_understanding, m.understanding,
                                                   m.understanding_norm, m.mlm_head) for p in layer.parameters())


def learner_params(learner):
    return sum(int(np.prod(p.shape)) for name, p in learner.named_parameters() if not name.startswith("auxiliary"))


def forward_times(module, ids, valid, rounds):
    runners = {"teacher": lambda: module.teacher.mlm_head(module.teacher.understand(ids, valid)[0]),
               "assistant": lambda: module.assistant(ids, valid, use_auxiliary=False)}
    for i, s in enumerate(module.students):
        runners[f"student{i}"] = (lambda s=s: s(ids, valid, use_auxiliary=False))
    best = {name: float("inf") for name in runners}
    with paddle.no_grad():
        for _ in range(rounds):
            for name, run in runners.items():
                started = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - started)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--tokenizer", default="output/tokenizer/tokenizer.json")
    parser.add_argument("--out", help="directory for the runs (default: a temporary one); finished runs are reused")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--nlu-steps", type=int, default=100)
    parser.add_argument("--distill-steps", type=int, default=200)
    parser.add_argument("--per-class", type=int, default=5, help="controllability: windows per topic")
    parser.add_argument("--prefixes", type=int, default=24)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not Path(args.tokenizer).is_file():
        raise SystemExit(f"{args.tokenizer} not found: train it with `python tools/train_tokenizer.py --out "
                         f"{args.tokenizer}` (or pass --tokenizer).")
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_titan_"))
    common = [f"Data.tokenizer={args.tokenizer}", "Global.device=cpu", "Engine.logging_freq=25", "Engine.eval_iters=4"]

    pre_ckpt, _ = train("configs/ernie_titan/tiny.yaml", out / "pretrain", common + [
        f"Engine.eval_freq={args.steps}"], args.steps)
    nlu_ckpt, _ = train("configs/ernie_titan/tiny_nlu.yaml", out / "nlu", common + [
        f"Engine.init_from={pre_ckpt}", f"Engine.eval_freq={args.nlu_steps}"], args.nlu_steps)
    titan, tokenizer, _ = load_checkpoint_for_inference(pre_ckpt)
    classifier, _, _ = load_checkpoint_for_inference(nlu_ckpt)
    nlu_eval = json.loads(Path(nlu_ckpt).parent.joinpath("metrics.jsonl").read_text().splitlines()[-1])

    control, n_windows = controllability(titan, classifier, tokenizer, args.per_class, 64, args.seed)
    table(f"Controllability ({n_windows} validation windows of {len(TOPIC_CLASSES)} topics; topic classifier "
          f"validation accuracy {nlu_eval.get('eval_accuracy', float('nan')):.3f}, chance {1 / len(TOPIC_CLASSES):.3f})",
          ["generation", "keyword inclusion", "length error", "topic accuracy"],
          [[name, *values] for name, values in control.items()])

    rerank, n_prefixes = reranking(titan, tokenizer, args.prefixes, args.candidates, 24, args.seed)
    table(f"Credibility reranking ({n_prefixes} validation prefixes, {args.candidates} samples each, 24 tokens, "
          "T=1 top-k 20; perplexity under the generation module, median)",
          ["candidate", "discriminator P(original)", "perplexity"],
          [[name, *values] for name, values in rerank.items()])

    distill_ckpt, _ = train("configs/ernie_titan/tiny_distill.yaml", out / "distill", common + [
        f"Engine.eval_freq={args.distill_steps}"], args.distill_steps)
    distill_eval = json.loads(Path(distill_ckpt).parent.joinpath("metrics.jsonl").read_text().splitlines()[-1])
    module, _, _ = load_checkpoint_for_inference(distill_ckpt)
    assert isinstance(module, OnlineDistillModule)
    data = ErnieTitanTasks.build(ErnieTitanTasksConfig(split="validation", max_chars=100_000), tokenizer, 96)
    batch = [data[i] for i in range(8)]
    ids = paddle.to_tensor(np.stack([b["mlm_ids"] for b in batch]))
    valid = paddle.to_tensor(np.stack([b["mlm_valid"] for b in batch]))
    times = forward_times(module, ids, valid, args.rounds)
    teacher_params = understanding_params(module)
    rows = []
    learners = [("teacher", None), ("assistant", module.assistant)] + [(f"student{i}", s) for i, s in enumerate(module.students)]
    for name, learner in learners:
        params = teacher_params if learner is None else learner_params(learner)
        size = "" if learner is None else f"{learner.size.num_layers}x{learner.size.hidden_size}"
        rows.append([name, size or "Titan understanding path", distill_eval[f"eval_{name}_loss"],
                     f"{params / 1e6:.2f}M", params / teacher_params, times[name] * 1e3, times["teacher"] / times[name]])
    table(f"Online distillation ({args.distill_steps} steps; validation MLM loss, learners without their ALD layer; "
          "forward of 8 x 96 tokens, best of rounds)",
          ["model", "layers x hidden", "val MLM loss", "params", "params / teacher", "forward ms", "speed-up"], rows)
    print(json.dumps({"controllability": control, "reranking": rerank,
                      "distillation": {r[0]: {"val_loss": r[2], "params": r[3], "speedup": r[6]} for r in rows},
                      "out": str(out)}))


if __name__ == "__main__":
    main()
