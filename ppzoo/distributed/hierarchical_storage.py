"""SE-MoE hierarchical storage: expert parameters and their optimizer states in three tiers.

- **fast** (the device): the weights of the experts a layer is running, as Paddle tensors, within
  `fast_budget_mb`. Clean copies: evicting one only drops it (least recently used, never a pinned one).
- **cpu**: a cache of whole expert records (weights, Adam moments, beta powers) as numpy arrays, within
  `cpu_budget_mb`. Eviction picks the lowest *decayed hit count*: every access adds 1 to an expert's count
  and every optimizer step multiplies all counts by `decay`, so experts the gate favoured recently stay, and a
  burst long ago fades. An evicted record that changed is written back to disk first.
- **disk**: one numpy memmap file per expert holding its record (the tier of last resort, unbounded).

Training. The MoE layers' experts leave the model (and so the Paddle optimizer): an MoE layer asks this
storage for each expert (`MoELayer.expert_provider`). An expert runs as a PyLayer that saves only its input:
its weights are fetched to the fast tier in forward and again in backward, where the weight gradients are
added to gradient holders in CPU memory (objects with `.grad`, marked expert-parallel, so the engine's
gradient combination and norm clipping treat them like the experts' own parameters). The optimizer step then
streams every expert through the fast tier one at a time (weights + moments up, AdamW, back down): the same
AdamW update Paddle applies to the all-in-memory model, so the training curve is the same.

Prefetch (the "2D" of SE-MoE: across layers in forward and backward). When MoE layer i learns its routing plan
(rows per expert, before any expert runs) it loads its own experts and hands the experts the *next* MoE layer
will need to a background thread. Which ones is not known before that layer's gate runs (it needs layer i's
output and the attention in between), so the predictor is that layer's routing of the previous step (gates
change slowly; at the first step every expert). In backward the need is exact: the first expert of layer i to
run backward prefetches the experts layer i-1 used in forward. The loader thread copies outside the main
thread; time the main thread waits for a load counts as blocking, the rest as hidden.

On a CPU-only machine the fast and CPU tiers are both host memory: the budgets and the bytes accounted per
tier (what `peak_fast_mb` reports) are the storage's bookkeeping of where each copy lives. On GPU the fast
tier's tensors are created on the device (paddle.to_tensor on the current place); untested here.
"""
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from ppzoo.distributed.expert_parallel import EXPERT
from ppzoo.errors import CheckpointError, ConfigError

MB = float(1 << 20)
PARAM = "param"
KINDS = ("param", "moment1", "moment2", "beta1_pow_acc", "beta2_pow_acc")
# Paddle's AdamW accumulator names, as they appear in an optimizer state dict after the parameter's name.
STATE_SUFFIX = {"moment1": "_moment1_0", "moment2": "_moment2_0", "beta1_pow_acc": "_beta1_pow_acc_0",
                "beta2_pow_acc": "_beta2_pow_acc_0"}


class ExpertLayout:
    """One expert's record as a flat float32 array: its weights, then each weight's two Adam moments and two
    beta powers (shape [1], as Paddle keeps them)."""

    def __init__(self, shapes):
        self.names = list(shapes)
        self.spans = {}
        start = 0
        for kind in KINDS:
            for name in self.names:
                shape = list(shapes[name]) if kind in (PARAM, "moment1", "moment2") else [1]
                size = int(np.prod(shape))
                self.spans[(kind, name)] = (start, start + size, shape)
                start += size
        self.size = start
        self.param_size = sum(self.spans[(PARAM, n)][1] - self.spans[(PARAM, n)][0] for n in self.names)
        self.record_bytes = 4 * self.size
        self.param_bytes = 4 * self.param_size

    def view(self, flat, kind, name):
        start, end, shape = self.spans[(kind, name)]
        return flat[start:end].reshape(shape)


class TieredStore:
    """Expert records in the fast / cpu / disk tiers (see the module docstring). Thread-safe: one loader
    thread brings records up while the main thread computes."""

    def __init__(self, layout, keys, fast_budget_bytes, cpu_budget_bytes, directory, decay=0.9, prefetch=True):
        self.layout, self.keys = layout, list(keys)
        self.fast_budget, self.cpu_budget, self.decay = fast_budget_bytes, cpu_budget_bytes, decay
        if cpu_budget_bytes < layout.record_bytes:
            raise ConfigError(f"Distributed.se_moe.cpu_budget_mb={cpu_budget_bytes / MB:.3f} holds no expert record "
                              f"({layout.record_bytes / MB:.3f} MB each): raise it.")
        os.makedirs(directory, exist_ok=True)
        self.disk = {key: np.memmap(os.path.join(directory, f"{key}.f32"), dtype=np.float32, mode="w+",
                                    shape=(layout.size,)) for key in self.keys}
        self.cpu = OrderedDict()  # key -> numpy record
        self.dirty = set()
        self.score = {key: 0.0 for key in self.keys}
        self.fast = OrderedDict()  # key -> {name: paddle tensor}, least recently used first
        self.pinned = set()
        self.transient_fast = 0  # bytes of records streamed through the fast tier by the optimizer
        self.peak_fast = 0
        self.lock = threading.RLock()
        self.inflight = {}
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-prefetch") if prefetch else None
        self.reset_stats()

    # ---------------------------------------------------------------------------------------- stats
    def reset_stats(self):
        self.stats = {"fast_hits": 0, "fast_misses": 0, "cpu_hits": 0, "cpu_misses": 0, "bytes_moved": 0,
                      "load_s_hidden": 0.0, "load_s_blocking": 0.0}

    def fast_bytes(self):
        return len(self.fast) * self.layout.param_bytes + self.transient_fast

    def _note_fast(self):
        self.peak_fast = max(self.peak_fast, self.fast_bytes())

    # ------------------------------------------------------------------------------------ cpu / disk
    def _cpu_record(self, key):
        """The record in the CPU cache (read from disk on a miss, evicting by decayed hit count)."""
        with self.lock:
            self.score[key] += 1.0
            if key in self.cpu:
                self.stats["cpu_hits"] += 1
                return self.cpu[key]
            self.stats["cpu_misses"] += 1
            record = np.array(self.disk[key])
            self.stats["bytes_moved"] += self.layout.record_bytes
            while self.cpu and (len(self.cpu) + 1) * self.layout.record_bytes > self.cpu_budget:
                victim = min(self.cpu, key=lambda k: self.score[k])
                self._write_back(victim)
                del self.cpu[victim]
            self.cpu[key] = record
            return record

    def _write_back(self, key):
        if key in self.dirty:
            self.disk[key][:] = self.cpu[key]
            self.stats["bytes_moved"] += self.layout.record_bytes
            self.dirty.discard(key)

    def decay_scores(self):
        with self.lock:
            for key in self.score:
                self.score[key] *= self.decay

    def read(self, key):
        """A copy of the current record."""
        with self.lock:
            return np.array(self.cpu[key]) if key in self.cpu else np.array(self.disk[key])

    def write(self, key, record):
        with self.lock:
            self.disk[key][:] = record
            self.cpu.pop(key, None)
            self.dirty.discard(key)
            self.fast.pop(key, None)

    def flush(self):
        with self.lock:
            for key in list(self.dirty):
                self._write_back(key)
            for memmap in self.disk.values():
                memmap.flush()

    # ------------------------------------------------------------------------------------------ fast
    def _load_fast(self, key):
        record = self._cpu_record(key)
        weights = {name: paddle.to_tensor(self.layout.view(record, PARAM, name)) for name in self.layout.names}
        with self.lock:
            self.stats["bytes_moved"] += self.layout.param_bytes
            self.fast[key] = weights
            self._evict_fast()
            self._note_fast()
            self.inflight.pop(key, None)
        return weights

    def _evict_fast(self):
        while self.fast_bytes() > self.fast_budget:
            victim = next((k for k in self.fast if k not in self.pinned), None)
            if victim is None:
                return  # everything resident is in use: the working set's own size (reported as peak)
            del self.fast[victim]

    def _background_load(self, key):
        start = time.perf_counter()
        self._load_fast(key)
        with self.lock:
            self.stats["load_s_hidden"] += time.perf_counter() - start

    def prefetch(self, keys):
        """Bring `keys` to the fast tier in the background (no-op for resident or in-flight ones)."""
        if self.loader is None:
            return
        with self.lock:
            for key in keys:
                if key not in self.fast and key not in self.inflight:
                    self.inflight[key] = self.loader.submit(self._background_load, key)

    def acquire(self, key):
        """The expert's weights in the fast tier, pinned until `unpin`."""
        with self.lock:
            self.pinned.add(key)
            if key in self.fast:
                self.stats["fast_hits"] += 1
                self.fast.move_to_end(key)
                return self.fast[key]
            future = self.inflight.get(key)
            self.stats["fast_misses"] += 1
        start = time.perf_counter()
        if future is not None:
            future.result()
            with self.lock:
                waited = time.perf_counter() - start
                # The loader's time for this record was not hidden after all: move what we waited.
                self.stats["load_s_blocking"] += waited
                self.stats["load_s_hidden"] = max(0.0, self.stats["load_s_hidden"] - waited)
                if key in self.fast:
                    self.fast.move_to_end(key)
                    return self.fast[key]
        weights = self._load_fast(key)
        self.stats["load_s_blocking"] += time.perf_counter() - start
        return weights

    def unpin(self, keys=None):
        with self.lock:
            if keys is None:
                self.pinned.clear()
            else:
                self.pinned.difference_update(keys)
            self._evict_fast()

    def update(self, key, fn):
        """Stream the whole record through the fast tier: `fn(flat paddle tensor) -> new flat tensor`."""
        record = self._cpu_record(key)
        with self.lock:
            self.transient_fast += self.layout.record_bytes
            self._note_fast()
        flat = paddle.to_tensor(record)
        new = fn(flat).numpy()
        with self.lock:
            self.transient_fast -= self.layout.record_bytes
            self.stats["bytes_moved"] += 2 * self.layout.record_bytes
            if self.cpu.get(key) is record:
                record[:] = new
                self.dirty.add(key)
            else:  # evicted meanwhile: the disk copy is the record now
                self.disk[key][:] = new
                record = new
            if key in self.fast:  # keep the resident copy current
                self.fast[key] = {name: paddle.to_tensor(self.layout.view(record, PARAM, name))
                                  for name in self.layout.names}

    def wait(self):
        for future in list(self.inflight.values()):
            future.result()

    def close(self):
        if self.loader is not None:
            self.loader.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------------------
# The expert's computation with weights from the store


def _expert_forward(x, w):
    gate, up = paddle.matmul(x, w["w_gate"]), paddle.matmul(x, w["w_up"])
    return paddle.matmul(F.silu(gate) * up, w["w_down"])


class _StoredExpertFunction(PyLayer):
    """SwiGLU expert whose weights come from the store in forward and again in backward; saves only x."""

    @staticmethod
    def forward(ctx, x, storage, key):
        ctx.storage, ctx.key = storage, key
        ctx.save_for_backward(x)
        return _expert_forward(x, storage.store.acquire(key))

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensor()
        storage, key = ctx.storage, ctx.key
        storage.before_backward(key)
        w = storage.store.acquire(key)
        gate, up = paddle.matmul(x, w["w_gate"]), paddle.matmul(x, w["w_up"])
        sig = F.sigmoid(gate)
        silu = gate * sig
        hidden = silu * up
        d_hidden = paddle.matmul(dy, w["w_down"], transpose_y=True)
        d_up = d_hidden * silu
        d_gate = d_hidden * up * sig * (1.0 + gate * (1.0 - sig))
        grads = {"w_down": paddle.matmul(hidden, dy, transpose_x=True),
                 "w_gate": paddle.matmul(x, d_gate, transpose_x=True),
                 "w_up": paddle.matmul(x, d_up, transpose_x=True)}
        storage.accumulate_grad(key, grads)
        dx = paddle.matmul(d_gate, w["w_gate"], transpose_y=True) + paddle.matmul(d_up, w["w_up"], transpose_y=True)
        storage.store.unpin([key])
        return dx


class GradientHolder:
    """An expert's flat weight gradient in CPU memory, shaped like a parameter for the engine's gradient
    combination and clipping (`.grad`, expert-parallel)."""

    expert_parallel = EXPERT
    no_sync = True

    def __init__(self, key, size):
        self.key = key
        self.grad = paddle.zeros([size], dtype="float32").cpu()  # CPU memory, not the fast tier


class ExpertStorage:
    """The MoE layers' expert provider and the experts' optimizer, over a TieredStore."""

    def __init__(self, named_moe_layers, se_cfg, opt_cfg, directory):
        if opt_cfg.name != "AdamW":
            raise ConfigError(f"Distributed.se_moe keeps AdamW optimizer states for the experts; Optimizer.name="
                              f"{opt_cfg.name!r} is not supported with it (use AdamW or disable se_moe).")
        self.beta1, self.beta2, self.epsilon = opt_cfg.beta1, opt_cfg.beta2, opt_cfg.epsilon
        self.weight_decay = opt_cfg.weight_decay
        self.layers = []  # (moe layer, [keys of its local experts]) in forward order
        self.key_of = {}
        initial = {}
        layout = None
        for prefix, moe in named_moe_layers:
            keys = []
            for g in moe.local_expert_indices():
                expert = moe.experts[str(g)]
                key = f"{prefix}.experts.{g}" if prefix else f"experts.{g}"
                if layout is None:
                    layout = ExpertLayout({name: p.shape for name, p in expert.named_parameters()})
                initial[key] = {name: p.numpy() for name, p in expert.named_parameters()}
                self.key_of[(id(moe), g)] = key
                keys.append(key)
            moe.experts = nn.LayerDict()  # the weights now live in the store, not in the model
            moe.expert_provider = self
            self.layers.append((moe, keys))
        if layout is None:
            raise ConfigError("Distributed.se_moe.enable is set but the model has no MoE layer.")
        self.layout = layout
        all_keys = [k for _, keys in self.layers for k in keys]
        per_layer = max(len(keys) for _, keys in self.layers) * layout.param_bytes
        fast_budget = se_cfg.fast_budget_mb * MB
        if fast_budget < per_layer:
            raise ConfigError(f"Distributed.se_moe.fast_budget_mb={se_cfg.fast_budget_mb} cannot hold one MoE layer's "
                              f"experts ({per_layer / MB:.3f} MB): raise it to at least that.")
        self.store = TieredStore(layout, all_keys, fast_budget, se_cfg.cpu_budget_mb * MB, directory, se_cfg.decay,
                                 se_cfg.prefetch)
        for key, weights in initial.items():
            self.store.write(key, self._record(weights))
        self.holders = {key: GradientHolder(key, layout.param_size) for key in all_keys}
        self.layer_index = {id(moe): i for i, (moe, _) in enumerate(self.layers)}
        self.layer_of_key = {key: i for i, (_, keys) in enumerate(self.layers) for key in keys}
        self.predicted = {i: list(keys) for i, (_, keys) in enumerate(self.layers)}  # first step: every expert
        self.active = {}
        self.backward_started = set()
        self.rows = {}

    def _record(self, weights):
        """A fresh record: the weights, zero moments, beta powers at their first-step values (as Paddle's)."""
        record = np.zeros(self.layout.size, dtype=np.float32)
        for name in self.layout.names:
            self.layout.view(record, PARAM, name)[:] = weights[name]
            self.layout.view(record, "beta1_pow_acc", name)[:] = self.beta1
            self.layout.view(record, "beta2_pow_acc", name)[:] = self.beta2
        return record

    # ------------------------------------------------------------------------------ provider interface
    def plan(self, moe, rows_per_local_expert):
        """Called by MoE layer i with its routing plan before its experts run."""
        i = self.layer_index[id(moe)]
        keys = self.layers[i][1]
        active = [k for k, rows in zip(keys, rows_per_local_expert) if rows > 0]
        self.rows.update({k: rows for k, rows in zip(keys, rows_per_local_expert)})
        self.active[i] = active
        self.backward_started.discard(i)
        self.store.unpin()  # the previous layer is done with its experts
        self.store.prefetch(active)  # missing ones load one after another while the first is awaited
        if i + 1 < len(self.layers):
            self.store.prefetch(self.predicted[i + 1])
        self.predicted[i] = active  # next step's prediction for this layer

    def expert(self, moe, g):
        key = self.key_of[(id(moe), g)]
        if self.rows.get(key, 0) == 0:
            # No rows: the plain path's expert returns [0, d] and gets a zero gradient; so does this one.
            return lambda x: paddle.zeros([0, self.layout.spans[(PARAM, "w_down")][2][1]], dtype=x.dtype)
        return lambda x: _StoredExpertFunction.apply(x, self, key)

    def before_backward(self, key):
        i = self.layer_of_key[key]
        if i not in self.backward_started:
            self.backward_started.add(i)
            self.store.unpin()
            if i > 0:
                self.store.prefetch(self.active.get(i - 1, []))  # exact: what layer i-1 used in forward

    def accumulate_grad(self, key, grads):
        with self.store.lock:  # the expert's gradients are on the fast tier until they move to CPU memory
            self.store.peak_fast = max(self.store.peak_fast, self.store.fast_bytes() + self.layout.param_bytes)
        flat = paddle.concat([grads[name].reshape([-1]) for name in self.layout.names]).cpu()
        holder = self.holders[key]
        holder.grad = holder.grad + flat

    # ------------------------------------------------------------------------------------- optimizer
    def gradient_holders(self):
        return list(self.holders.values())

    @paddle.no_grad()
    def step(self, lr):
        """AdamW on every local expert (as Paddle's AdamW: decoupled decay, bias correction through the
        beta powers), streamed through the fast tier one record at a time; gradients are zeroed."""
        self.store.wait()
        self.store.unpin()
        b1, b2, eps, decay = self.beta1, self.beta2, self.epsilon, self.weight_decay
        layout = self.layout
        for key, holder in self.holders.items():
            grad = holder.grad

            def adamw(flat, grad=grad):
                parts = []
                offset = 0
                for name in layout.names:
                    p = layout.view(flat, PARAM, name).reshape([-1])
                    size = int(p.shape[0])
                    g = grad[offset:offset + size].to(flat.place)
                    offset += size
                    m1 = layout.view(flat, "moment1", name).reshape([-1])
                    m2 = layout.view(flat, "moment2", name).reshape([-1])
                    b1p = layout.view(flat, "beta1_pow_acc", name).reshape([-1])
                    b2p = layout.view(flat, "beta2_pow_acc", name).reshape([-1])
                    p = p * (1.0 - lr * decay)
                    m1 = b1 * m1 + (1.0 - b1) * g
                    m2 = b2 * m2 + (1.0 - b2) * g * g
                    lr_t = lr * paddle.sqrt(1.0 - b2p) / (1.0 - b1p)
                    p = p - lr_t * (m1 / (paddle.sqrt(m2) + eps * paddle.sqrt(1.0 - b2p)))
                    parts.append({"param": p, "moment1": m1, "moment2": m2, "beta1_pow_acc": b1p * b1,
                                  "beta2_pow_acc": b2p * b2})
                return paddle.concat([part[kind] for kind in KINDS for part in parts])

            self.store.update(key, adamw)
            holder.grad = paddle.zeros_like(grad)
        self.store.decay_scores()

    # ----------------------------------------------------------------------------------- checkpoints
    def model_state(self):
        """Expert weights under the model's own structured names (the all-in-memory checkpoint's keys)."""
        state = {}
        for key in self.holders:
            record = self.store.read(key)
            for name in self.layout.names:
                state[f"{key}.{name}"] = paddle.to_tensor(self.layout.view(record, PARAM, name))
        return state

    def optimizer_state(self):
        state = {}
        for key in self.holders:
            record = self.store.read(key)
            for name in self.layout.names:
                for kind, suffix in STATE_SUFFIX.items():
                    state[f"{key}.{name}{suffix}"] = paddle.to_tensor(self.layout.view(record, kind, name))
        return state

    def load_state(self, model_state, optimizer_state):
        """Take this storage's experts out of a checkpoint's model and optimizer state dicts (removing them)."""
        for key in self.holders:
            names = [f"{key}.{name}" for name in self.layout.names]
            missing = [n for n in names if n not in model_state]
            if missing:
                raise CheckpointError(f"the checkpoint has no {missing[0]}: it was not written by this MoE model "
                                      "(Model.num_experts and the layer layout must be the checkpoint's).")
            record = self._record({name: np.asarray(model_state.pop(f"{key}.{name}")) for name in self.layout.names})
            for name in self.layout.names:
                for kind, suffix in STATE_SUFFIX.items():
                    value = optimizer_state.pop(f"{key}.{name}{suffix}", None)
                    if value is not None:
                        self.layout.view(record, kind, name)[:] = np.asarray(value).reshape(
                            self.layout.view(record, kind, name).shape)
            self.store.write(key, record)

    def step_metrics(self):
        """Counters since the last call: fast-tier hit rate, bytes moved between tiers, load time hidden by
        prefetch and load time the step waited, and the peak fast-tier bytes so far."""
        s = self.store.stats
        lookups = s["fast_hits"] + s["fast_misses"]
        metrics = {"se_moe_hit_rate": s["fast_hits"] / lookups if lookups else 1.0,
                   "se_moe_cpu_hit_rate": s["cpu_hits"] / max(1, s["cpu_hits"] + s["cpu_misses"]),
                   "se_moe_mb_moved": s["bytes_moved"] / MB,
                   "se_moe_load_ms_hidden": 1e3 * s["load_s_hidden"],
                   "se_moe_load_ms_blocking": 1e3 * s["load_s_blocking"],
                   "se_moe_peak_fast_mb": self.store.peak_fast / MB}
        self.store.reset_stats()
        return metrics


def check_se_moe_config(cfg):
    """ConfigError for a Distributed.se_moe section that cannot work as written."""
    se, where = cfg.Distributed.se_moe, f"Distributed.se_moe (in {cfg.source})"
    if se.fused_comm and (cfg.Distributed.pp_degree > 1 or cfg.Distributed.sharding_degree > 1):
        raise ConfigError(f"{where}: fused_comm replaces data parallelism's gradient all-reduce and does not combine "
                          "with pp_degree or sharding_degree > 1; set fused_comm: false there.")
    if se.fused_comm and se.bucket_mb <= 0:
        raise ConfigError(f"{where}: bucket_mb={se.bucket_mb} must be positive.")
    if not se.enable:
        return
    if se.fast_budget_mb <= 0 or se.cpu_budget_mb <= 0:
        raise ConfigError(f"{where}: fast_budget_mb and cpu_budget_mb must be positive (megabytes).")
    if not 0.0 < se.decay <= 1.0:
        raise ConfigError(f"{where}: decay={se.decay} must be in (0, 1] (1: hit counts never fade).")
    mp = cfg.Engine.mix_precision
    if mp.enable and mp.level == "O2":
        raise ConfigError(f"{where}: the stored experts are float32 and train with float32 AdamW states; "
                          "Engine.mix_precision.level O2 casts the model's weights: use O1 with se_moe.")


def build_expert_storage(cfg, module, rank=0):
    """The ExpertStorage for `module`'s MoE layers when Distributed.se_moe.enable, else None."""
    check_se_moe_config(cfg)
    se = cfg.Distributed.se_moe
    if not se.enable:
        return None
    from ppzoo.nn.moe.layer import MoELayer

    named = [(name, layer) for name, layer in module.named_sublayers() if isinstance(layer, MoELayer)]
    directory = se.disk_dir or os.path.join(cfg.Engine.output_dir, "expert_store")
    return ExpertStorage(named, se, cfg.Optimizer, os.path.join(directory, f"rank{rank}"))
