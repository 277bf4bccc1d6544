"""SE-MoE: ring-memory inference and training with hierarchical expert storage, against all in memory.

Inference: a MoE-GPT (4 layers, 2 of them MoE with 8 SwiGLU experts each) runs forward passes on a batch with
all weights in memory, and through ppzoo.inference.ring_memory with a fast-memory budget of a quarter of its
weights (K resident sections + the one loading fit the budget), measured alternately in one process.
Target: ring throughput >= 0.8x all in memory.

Training: configs/moe_gpt/tiny.yaml against configs/moe_gpt/se_moe_tiny.yaml (the same model, experts in the
disk / CPU-cache / fast tiers), same seed, data and steps, through the Engine. Fast-tier memory is counted
the same way for both: the plain run holds every parameter with its gradient and two Adam moments on the
device; the SE-MoE run holds the dense ones so, plus the storage's measured peak of expert bytes in the fast
tier (resident weights, an expert's gradients before they move to CPU memory, the record the optimizer is
updating). Target: peak fast-tier memory <= 0.5x; the step-time ratio is reported. On this CPU-only machine
the tiers are all host memory: the fast-tier figures are the storage's accounting, the times are real.

    python benchmarks/bench_se_moe.py [--steps 30] [--repeats 5]
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import paddle  # noqa: E402

from ppzoo import Engine, load_config  # noqa: E402
from ppzoo.inference.ring_memory import RingMemoryModel  # noqa: E402
from ppzoo.models.moe_gpt.model import MoEGPTConfig, MoEGPTForCausalLM  # noqa: E402

MB = float(1 << 20)


def tokenizer_path(tmp):
    path = REPO / "output/tokenizer/tokenizer.json"
    if path.exists():
        return path
    from ppzoo.data.corpus import builtin_texts
    from ppzoo.data.tokenizer import train_byte_level_bpe

    return train_byte_level_bpe(builtin_texts("train", 2_000_000), 4096).save(Path(tmp) / "tokenizer.json")


def bench_inference(repeats):
    config = MoEGPTConfig(vocab_size=1024, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688,
                          num_experts=8, expert_intermediate_size=512, random_routing=False)
    paddle.seed(0)
    plain = MoEGPTForCausalLM(config)
    plain.eval()
    ringed = MoEGPTForCausalLM(config)
    ringed.set_state_dict(plain.state_dict())
    ringed.eval()
    total = sum(int(p.size) * 4 for p in plain.parameters())
    budget = total / 4
    probe = RingMemoryModel(MoEGPTForCausalLM(config), slots=1)  # only to size the sections
    slots = int(budget // max(probe.section_bytes)) - 1
    probe.close()
    ring = RingMemoryModel(ringed, slots=slots, fast_budget_bytes=budget)
    ids = paddle.randint(0, config.vocab_size, [8, 256])
    with paddle.no_grad():
        reference = plain(ids)[0]
    diff = float((ring(ids)[0] - reference).abs().max())
    times = {"all in memory": [], "ring memory": []}
    for _ in range(repeats):
        for name, run in (("all in memory", plain), ("ring memory", ring)):
            start = time.perf_counter()
            with paddle.no_grad():
                run(ids)[0].numpy()
            times[name].append(time.perf_counter() - start)
    tokens = ids.shape[0] * ids.shape[1]
    base = tokens / statistics.median(times["all in memory"])
    ring.reset_stats()
    with paddle.no_grad():
        ring(ids)[0].numpy()
    print(f"\nInference: MoE-GPT {total / MB:.1f} MB of weights, {len(ring.sections)} sections, fast budget "
          f"{budget / MB:.1f} MB ({total / budget:.0f}x smaller), K={slots} slots; batch 8 x 256; "
          f"median of {repeats}; max |logit diff| {diff:.1e}")
    print("| mode | fast memory MB | tokens/s | throughput ratio | load time hidden |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| all in memory | {total / MB:.1f} | {base:,.0f} | 1.00 | - |")
    ring_tps = tokens / statistics.median(times["ring memory"])
    hidden = 1.0 - ring.stats["wait_s"] / max(ring.stats["load_s"], 1e-9)
    print(f"| ring memory (K={slots}) | {ring.peak_resident / MB:.1f} | {ring_tps:,.0f} | {ring_tps / base:.2f} | "
          f"{100 * max(hidden, 0.0):.0f}% |")
    ring.close()


def bench_training(steps, tmp, num_experts):
    tokenizer = tokenizer_path(tmp)
    rows = []
    scale = num_experts / 8  # se_moe_tiny's budgets are for 8 experts per MoE layer: keep their proportion
    for name, config, extra in (("plain", "tiny.yaml", []), ("SE-MoE storage", "se_moe_tiny.yaml", [
            f"Distributed.se_moe.fast_budget_mb={3.5 * scale}", f"Distributed.se_moe.cpu_budget_mb={8.0 * scale}"])):
        cfg = load_config(str(REPO / "configs/moe_gpt" / config), overrides=[
            f"Engine.max_steps={steps}", f"Engine.output_dir={tmp}/{name.replace(' ', '_')}_{num_experts}",
            "Engine.logging_freq=1", "Engine.eval_freq=0", f"Engine.save_steps={steps * 10}",
            "Engine.progress_bar=false", f"Data.tokenizer={tokenizer}", "Global.device=cpu",
            f"Model.num_experts={num_experts}", *extra])
        engine = Engine(cfg)
        # Every parameter the Paddle optimizer holds (plain: experts included; SE-MoE: the dense ones).
        dense = sum(int(p.size) * 4 for n, p in engine.network.named_parameters() if ".experts." not in n)
        experts_in_model = sum(int(p.size) * 4 for n, p in engine.network.named_parameters() if ".experts." in n)
        engine.fit()
        with open(Path(engine.output_dir) / "metrics.jsonl") as f:
            records = [json.loads(line) for line in f if line.strip()]
        expert_fast = 4 * experts_in_model  # weights, gradients, two Adam moments
        if engine.expert_storage is not None:
            expert_fast = max(r["se_moe_peak_fast_mb"] for r in records) * MB
        # Parameters, gradients and two Adam moments of what the Paddle optimizer holds, plus the storage's peak.
        fast = 4 * dense + expert_fast
        tokens = cfg.Global.global_batch_size * cfg.Data.seq_len
        later = records[len(records) // 3:]  # past warm-up
        step_s = statistics.median(tokens / r["tokens_per_sec"] for r in later)
        extra = ""
        if engine.expert_storage is not None:
            hit = statistics.mean(r["se_moe_hit_rate"] for r in later)
            moved = statistics.mean(r["se_moe_mb_moved"] for r in later)
            hidden = sum(r["se_moe_load_ms_hidden"] for r in later)
            blocking = sum(r["se_moe_load_ms_blocking"] for r in later)
            extra = f"hit {hit:.2f}, {moved:.1f} MB moved/step, load hidden {hidden / max(hidden + blocking, 1e-9):.0%}"
            engine.expert_storage.store.close()
        rows.append((name, fast, expert_fast, step_s, records[-1]["loss"], extra))
    print(f"\nTraining: MoE-GPT tiny, {num_experts} experts of 258 KiB in each of 2 MoE layers, {steps} steps, "
          "median step time past warm-up")
    print("| run | peak fast MB: experts | ratio | all (+ dense) | ratio | step s | step-time ratio | final loss | storage |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    base_fast, base_expert, base_step = rows[0][1], rows[0][2], rows[0][3]
    for name, fast, expert_fast, step_s, loss, extra in rows:
        print(f"| {name} | {expert_fast / MB:.2f} | {expert_fast / base_expert:.2f} | {fast / MB:.2f} | "
              f"{fast / base_fast:.2f} | {step_s:.3f} | {step_s / base_step:.2f} | {loss:.4f} | {extra or '-'} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32], help="experts per MoE layer")
    args = parser.parse_args()
    bench_inference(args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        for num_experts in args.experts:
            bench_training(args.steps, tmp, num_experts)


if __name__ == "__main__":
    main()
