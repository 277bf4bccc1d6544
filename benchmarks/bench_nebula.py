"""Nebula-I against plain data parallelism, both across two clusters over the same emulated WAN.

    sudo python benchmarks/bench_nebula.py [--steps 200] [--nebula-steps 800] [--rate 50mbit] [--delay 0.05]

The WAN: two network namespaces joined by a veth pair shaped to --rate with tc (token bucket), plus --delay
seconds of one-way delay from a delaying relay (ppzoo.distributed.cross_cluster.wan). One cluster in each
namespace (tools/train.py, one process each): "english" (pydoc text) and "code" (stdlib sources).

  data parallel  Distributed.cross_cluster.mode=data_parallel: the leaders average the full float32
                 gradients every step (plain data parallelism across the clusters)
  nebula         mode=diloco: the decoder layers only, every 10 local steps, Nesterov outer optimizer,
                 compression chosen from the measured bandwidth, the exchange overlapped with 2 local steps

Measured from the leaders' metrics.jsonl: WAN bytes per step (frame bytes both ways, including the start-up
link probe), wall time, and the wall time at which the mean validation loss of the two clusters (each on its
own language) first reaches the target: data parallel's final loss + 2%. Same model, data and seed. A
Nebula step is a local step (8 samples per cluster, no WAN wait), a data-parallel step averages both
clusters' gradients (16 samples): Nebula gets more, cheaper steps (--nebula-steps), and the comparison is
the wall time each needs to reach the target, and the final losses. Then phase two: English -> Python
translation fine-tuned from the nebula code cluster's model, with and without distillation from it
(validation cross-entropy on held-out stdlib files' pairs).
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from make_certs import make_certs  # noqa: E402
from ppzoo.data.corpus import builtin_texts  # noqa: E402
from ppzoo.data.tokenizer import train_byte_level_bpe  # noqa: E402
from ppzoo.distributed.cross_cluster.wan import WanLink, namespaces_allowed, start_relay  # noqa: E402

OUT = ROOT / "output" / "bench_nebula"
SERVER_PORT, RELAY_PORT = 7820, 7821
TARGET_SLACK = 0.02


def cluster_config(out, name, language, role, address, certs, tokenizer, steps, cross_cluster):
    config = {
        "_base_": str(ROOT / "configs" / "nebula" / "pretrain_english.yaml"),
        "Global": {"seed": 1234, "device": "cpu", "global_batch_size": 8, "micro_batch_size": 8},
        "Engine": {"max_steps": steps, "output_dir": str(out / name), "logging_freq": 10, "eval_freq": 10,
                   "eval_iters": 4, "save_steps": 0, "progress_bar": False},
        "Model": {"module": "ChuXin", "vocab_size": 1024, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
                  "intermediate_size": 176, "max_position_embeddings": 128},
        "Data": {"tokenizer": str(tokenizer), "seq_len": 64,
                 "Train": {"dataset": "BuiltinLanguage", "language": language, "split": "train", "max_chars": 400_000},
                 "Eval": {"dataset": "BuiltinLanguage", "language": language, "split": "validation",
                          "max_chars": 40_000}},
        "Optimizer": {"lr": {"max_lr": 3.0e-3, "min_lr": 3.0e-4, "warmup_steps": 10, "decay_steps": steps}},
        "Distributed": {"cross_cluster": {"role": role, "address": address, "cert": certs[f"{name}_cert"],
                                          "key": certs[f"{name}_key"], "ca_cert": certs["ca_cert"], "reconnect_timeout": 60.0,
                                          **cross_cluster}},
    }
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def env():
    environment = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    environment.pop("CUDA_VISIBLE_DEVICES", None)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    return environment


def run_arm(link, out, certs, tokenizer, steps, cross_cluster):
    out.mkdir(parents=True, exist_ok=True)
    code = cluster_config(out, "code", "code", "server", f"127.0.0.1:{SERVER_PORT}", certs, tokenizer, steps,
                          cross_cluster)
    english = cluster_config(out, "english", "english", "client", f"{link.ips[1]}:{RELAY_PORT}", certs, tokenizer,
                             steps, cross_cluster)
    processes = [
        subprocess.Popen(link.command(side, [sys.executable, str(ROOT / "tools" / "train.py"), "-c", str(config)]),
                         cwd=ROOT, env=env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
        for side, config in ((1, code), (0, english))
    ]
    try:
        outputs = [p.communicate(timeout=1800) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    failures = [f"cluster {name} failed (exit {p.returncode}):\n{stdout[-1500:]}\n{stderr[-3000:]}"
                for name, p, (stdout, stderr) in zip(("code", "english"), processes, outputs) if p.returncode != 0]
    if failures:
        sys.exit("\n".join(failures))
    curves = {}
    for name in ("code", "english"):
        with open(out / name / "metrics.jsonl") as f:
            curves[name] = [json.loads(line) for line in f if line.strip()]
    evals = {}
    for name, records in curves.items():
        for record in records:
            if "eval_loss" in record:
                evals.setdefault(record["step"], []).append((record["eval_loss"], record["wall_time"]))
    points = [(step, sum(l for l, _ in v) / 2, max(t for _, t in v)) for step, v in sorted(evals.items()) if len(v) == 2]
    last = {name: records[-1] for name, records in curves.items()}
    return {
        "points": points,
        "final_loss": points[-1][1],
        "wall": max(r["wall_time"] for r in last.values()),
        "wan_bytes_per_step": last["english"]["wan_bytes"] / steps,
        "scheme": last["english"]["wan_scheme"],
        "topk_ratio": last["english"]["wan_topk_ratio"],
        "bandwidth": last["english"]["wan_bandwidth_mbit"],
        "rtt": last["english"]["wan_rtt_s"],
        "wait": last["english"]["wan_wait_s"],
    }


def run_translation(out, pretrained, tokenizer, kd_weight, steps):
    """Phase two from the nebula run's code-cluster model: English -> Python signature fine-tuning, with
    (kd_weight > 0) or without distillation from the pretrained model; returns the final validation CE."""
    config = {
        "_base_": str(ROOT / "configs" / "nebula" / "translate_kd.yaml"),
        "Global": {"seed": 1234, "device": "cpu", "global_batch_size": 8, "micro_batch_size": 8},
        "Engine": {"max_steps": steps, "output_dir": str(out), "logging_freq": 10, "eval_freq": 0, "eval_iters": 4,
                   "save_steps": 0, "progress_bar": False, "init_from": str(pretrained)},
        "Model": {"module": "NebulaTranslation", "vocab_size": 1024, "hidden_size": 64, "num_layers": 2,
                  "num_heads": 4, "intermediate_size": 176, "max_position_embeddings": 128,
                  "teacher": str(pretrained) if kd_weight > 0 else None, "kd_weight": kd_weight, "temperature": 2.0},
        "Data": {"tokenizer": str(tokenizer), "seq_len": 64},
        "Optimizer": {"lr": {"max_lr": 1.0e-3, "min_lr": 1.0e-4, "warmup_steps": 10, "decay_steps": steps}},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "-c", str(path)], cwd=ROOT, env=env(),
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"translation fine-tuning failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["eval_loss"]


def time_to(points, target):
    return next((wall for _step, loss, wall in points if loss <= target), None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="data-parallel steps")
    parser.add_argument("--nebula-steps", type=int, default=800, help="Nebula local steps")
    parser.add_argument("--rate", default="50mbit")
    parser.add_argument("--delay", type=float, default=0.05, help="one-way delay, seconds")
    parser.add_argument("--sync-every", type=int, default=10)
    parser.add_argument("--translate-steps", type=int, default=150, help="phase-two fine-tuning steps per run")
    args = parser.parse_args()
    allowed, why = namespaces_allowed()
    if not allowed:
        sys.exit(f"bench_nebula needs network namespaces: {why}")
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    tokenizer = train_byte_level_bpe(builtin_texts("train", 300_000), 1024).save(OUT / "tokenizer.json")
    certs = make_certs(str(OUT / "certs"), ["english", "code"])
    arms = {
        "data parallel": {"steps": args.steps, "mode": "data_parallel"},
        "nebula": {"steps": args.nebula_steps, "mode": "diloco", "sync_every": args.sync_every, "sync_params": ["model.model.layers.*"],
                   "compression": "auto", "comm_budget_s": 0.05, "overlap_steps": 2},
    }
    results = {}
    link = WanLink(rate=args.rate, subnet=88)
    relay = None
    try:
        link.setup()
        relay = start_relay(link, RELAY_PORT, SERVER_PORT, args.delay, env=env(), cwd=ROOT)
        for name, cross_cluster in arms.items():
            steps = cross_cluster.pop("steps")
            print(f"running {name} ({steps} steps over {args.rate}, {args.delay * 1000:.0f} ms one way) ...",
                  flush=True)
            started = time.perf_counter()
            results[name] = run_arm(link, OUT / name.replace(" ", "_"), certs, tokenizer, steps,
                                    {"enable": True, **cross_cluster})
            results[name]["steps"] = steps
            print(f"  done in {time.perf_counter() - started:.0f}s", flush=True)
    finally:
        if relay is not None and relay.poll() is None:
            os.killpg(relay.pid, signal.SIGKILL)
            relay.communicate()
        link.teardown()

    dp, nb = results["data parallel"], results["nebula"]
    target = dp["final_loss"] * (1 + TARGET_SLACK)
    rows = []
    for name, r in results.items():
        reached = time_to(r["points"], target)
        rows.append((name, r["steps"], r["wan_bytes_per_step"] / 1e3, r["wall"], reached, r["final_loss"], r["scheme"]))
    print(f"\nlink: measured {dp['bandwidth']:.1f} Mbit/s, rtt {dp['rtt'] * 1000:.0f} ms; target validation loss "
          f"{target:.4f} (data parallel's final {dp['final_loss']:.4f} + 2%)")
    print(f"{'run':<14} {'steps':>6} {'WAN kB/step':>12} {'wall s':>8} {'s to target':>12} {'final loss':>11}  scheme")
    for name, steps, kb, wall, reached, loss, scheme in rows:
        reached_text = f"{reached:.1f}" if reached is not None else "not reached"
        print(f"{name:<14} {steps:>6} {kb:>12.1f} {wall:>8.1f} {reached_text:>12} {loss:>11.4f}  {scheme}")
    dp_reached, nb_reached = time_to(dp["points"], target), time_to(nb["points"], target)
    bytes_ratio = dp["wan_bytes_per_step"] / nb["wan_bytes_per_step"]
    speedup = dp_reached / nb_reached if nb_reached else None
    loss_gap = nb["final_loss"] / dp["final_loss"] - 1
    print(f"{'ratio':<14} {'':>6} {bytes_ratio:>11.1f}x {dp['wall'] / nb['wall']:>7.2f}x "
          f"{(f'{speedup:.2f}x' if speedup else 'n/a'):>12} {loss_gap * 100:>+10.2f}%")
    print(f"targets: >= 10x fewer WAN bytes: {'met' if bytes_ratio >= 10 else 'NOT met'}; >= 3x faster to target: "
          f"{'met' if speedup and speedup >= 3 else 'NOT met'}; final loss within 2%: "
          f"{'met' if loss_gap <= 0.02 else 'NOT met'}")
    # Phase two: translation fine-tuning from the nebula run's code-cluster model, with and without KD.
    pretrained = OUT / "nebula" / "code"
    plain = run_translation(OUT / "translate_plain", pretrained, tokenizer, 0.0, args.translate_steps)
    distilled = run_translation(OUT / "translate_kd", pretrained, tokenizer, 0.5, args.translate_steps)
    print(f"\ntranslation (docstring -> signature, {args.translate_steps} steps from the nebula code-cluster model):")
    print(f"{'fine-tuning':<22} {'validation CE':>14}")
    print(f"{'plain':<22} {plain:>14.4f}")
    print(f"{'with KD (0.5, T=2)':<22} {distilled:>14.4f}")
    print(f"{'ratio KD / plain':<22} {distilled / plain:>14.3f}")
    print(json.dumps({"translation_ce_plain": plain, "translation_ce_kd": distilled,
                      "wan_bytes_ratio": round(bytes_ratio, 2), "speedup_to_target": speedup and round(speedup, 2),
                      "final_loss_gap": round(loss_gap, 4), "dp_final_loss": dp["final_loss"],
                      "nebula_final_loss": nb["final_loss"], "nebula_scheme": nb["scheme"]}))


if __name__ == "__main__":
    main()
