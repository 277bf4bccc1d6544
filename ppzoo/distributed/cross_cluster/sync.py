"""Cross-cluster synchronization (Nebula-I), hooked into the Engine's step.

Two clusters train the whole model, each on its own data, with data parallelism inside (Fleet, gloo on
CPU). Their leaders (rank 0 of each cluster) meet over a SecureChannel. In `diloco` mode:

  every sync_every steps:  pseudo-gradient  d = global - local      (only the sync_params subset)
                           leader: compress d with error feedback, exchange with the peer leader in a
                           background thread while local steps go on (overlap_steps of them)
                           both leaders: g = (own sent + peer's) / 2, Nesterov outer step on `global`
                           (the same arithmetic on the same numbers: the clusters stay identical)
                           leader broadcasts the new global to its cluster; every rank sets
                           local <- new global + (local now - local when sent)   (keeps the overlap steps)

Parameters outside sync_params never cross the WAN: they stay each cluster's own. In `data_parallel` mode
(the baseline) the leaders average the full gradients before every optimizer step, uncompressed: plain
data parallelism across the clusters over the same link.
"""
import fnmatch
import threading
import time

import numpy as np
import paddle
import paddle.distributed as dist

from ppzoo.distributed.cross_cluster.channel import SecureChannel
from ppzoo.distributed.cross_cluster.compression import SCHEMES, ErrorFeedbackCompressor, choose_compression, \
    decompress
from ppzoo.errors import ConfigError

MODES = ("diloco", "data_parallel")
PROBE_BYTES = 1 << 20  # long enough on a 50 Mbit/s link (~170 ms) to stand out from the round trip


def select_parameters(module, patterns):
    """[(name, param)] of the module's trainable parameters whose structured name matches a pattern."""
    chosen = [(name, p) for name, p in module.named_parameters()
              if not p.stop_gradient and any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]
    if not chosen:
        names = [name for name, _ in module.named_parameters()][:8]
        raise ConfigError(
            f"Distributed.cross_cluster.sync_params={patterns} matches no trainable parameter; names look like "
            f"{names} (fnmatch patterns, e.g. '*.layers.*.attn.*' or 'model.lm_head.*')."
        )
    return chosen


def flatten(params):
    return np.concatenate([p.numpy().reshape(-1).astype(np.float32) for _, p in params])


def unflatten_into(vector, params):
    offset = 0
    for _, p in params:
        n = int(np.prod(p.shape))
        p.set_value(vector[offset:offset + n].reshape(p.shape).astype(p.numpy().dtype))
        offset += n


class NesterovOuterOptimizer:
    """SGD with Nesterov momentum on pseudo-gradients (DiLoCo's outer optimizer)."""

    def __init__(self, lr, momentum, size):
        self.lr, self.momentum = lr, momentum
        self.buffer = np.zeros(size, dtype=np.float32)

    def step(self, params, grad):
        self.buffer = self.momentum * self.buffer + grad
        return params - self.lr * (grad + self.momentum * self.buffer)


def check_config(cfg, env):
    where = "Distributed.cross_cluster"
    if cfg.mode not in MODES:
        raise ConfigError(f"{where}.mode={cfg.mode!r}; use one of: {', '.join(MODES)}.")
    if cfg.compression != "auto" and cfg.compression not in SCHEMES:
        raise ConfigError(f"{where}.compression={cfg.compression!r}; use auto or one of: {', '.join(SCHEMES)}.")
    if cfg.sync_every < 1 or not 0 <= cfg.overlap_steps < cfg.sync_every:
        raise ConfigError(f"{where}: need sync_every >= 1 and 0 <= overlap_steps < sync_every (got "
                          f"{cfg.sync_every}, {cfg.overlap_steps}).")
    if not 0 < cfg.topk_ratio <= 1:
        raise ConfigError(f"{where}.topk_ratio={cfg.topk_ratio} must be in (0, 1].")
    if env.mp_size > 1 or env.pp_size > 1 or env.sharding_size > 1 or env.ep_size > 1:
        raise ConfigError(f"{where} syncs whole parameters held by each cluster's leader: use data parallelism "
                          "only inside a cluster (mp/pp/sharding/ep degrees 1).")


class CrossClusterSync:
    """The Engine hook: before_optimizer_step() (data_parallel mode) and after_step(step) (diloco)."""

    def __init__(self, cfg, module, env, max_steps):
        check_config(cfg, env)
        self.cfg, self.env, self.max_steps = cfg, env, max_steps
        self.is_leader = env.rank == 0
        self.params = select_parameters(module, cfg.sync_params) if cfg.mode == "diloco" else \
            [(name, p) for name, p in module.named_parameters() if not p.stop_gradient]
        self.size = int(sum(np.prod(p.shape) for _, p in self.params))
        self.channel = None
        self.started = None
        self.bandwidth = None  # bytes/s, measured at connect and refreshed by every exchange
        self.rtt = 0.0
        self.scheme, self.topk_ratio = "none", 1.0
        self.compressor = ErrorFeedbackCompressor(self.size)
        self.global_params = flatten(self.params) if cfg.mode == "diloco" else None
        self.outer = NesterovOuterOptimizer(cfg.outer_lr, cfg.outer_momentum, self.size)
        self.pending = None  # (apply_at_step, local snapshot when sent, thread, result holder)
        self.syncs = 0
        self.wait_s = 0.0  # time the training thread waited for an exchange (the part not hidden by overlap)
        self.exchange_s = 0.0  # time exchanges took in the background

    # ---------------------------------------------------------------------------------- link setup
    def _start(self):
        if self.started is not None:
            return
        if self.is_leader:
            c = self.cfg
            self.channel = SecureChannel(c.role, c.address, c.cert, c.key, c.ca_cert, c.reconnect_timeout).connect()
            self._measure_link()
        self.started = time.perf_counter()

    def _measure_link(self):
        """Round trip and this leader's outgoing bandwidth, by ping-pong (each side times its own request:
        a symmetric exchange would time the two leaders' start skew instead)."""
        client = self.channel.role == "client"
        rtts = []
        for _ in range(3):  # the first rounds also pay for TCP slow start: take the fastest
            for mine in (client, not client):
                if mine:
                    begin = time.perf_counter()
                    self.channel.send({"probe": "ping"})
                    self.channel.recv()
                    rtts.append(time.perf_counter() - begin)
                else:
                    self.channel.recv()
                    self.channel.send({"probe": "pong"})
        self.rtt = min(rtts)
        probe = {"x": np.zeros(PROBE_BYTES, dtype=np.uint8)}
        for mine in (client, not client):
            if mine:
                begin = time.perf_counter()
                self.channel.send({"probe": "bandwidth"}, probe)
                self.channel.recv()
                elapsed = time.perf_counter() - begin
            else:
                self.channel.recv()
                self.channel.send({"probe": "received"})
        self.bandwidth = PROBE_BYTES / max(elapsed - self.rtt, 1e-3)
        self._choose_scheme()

    def _choose_scheme(self):
        if self.cfg.compression == "auto":
            self.scheme, self.topk_ratio = choose_compression(4 * self.size, self.bandwidth, self.cfg.comm_budget_s)
        else:
            self.scheme, self.topk_ratio = self.cfg.compression, self.cfg.topk_ratio
        self.compressor.scheme, self.compressor.topk_ratio = self.scheme, self.topk_ratio

    # ------------------------------------------------------------------------------------ the hooks
    def before_optimizer_step(self):
        """data_parallel mode: average the full gradients with the other cluster, every step."""
        if self.cfg.mode != "data_parallel":
            return
        self._start()
        grads = [(name, p.grad) for name, p in self.params]
        if self.is_leader:
            local = np.concatenate([
                (g.numpy().reshape(-1) if g is not None else np.zeros(int(np.prod(p.shape)), np.float32))
                for (_, g), (_, p) in zip(grads, self.params)]).astype(np.float32)
            _meta, peer = self.channel.exchange({"kind": "grad"}, {"values": local})
            averaged = (local + peer["values"]) / 2
        else:
            averaged = np.zeros(self.size, dtype=np.float32)
        averaged = self._broadcast(averaged)
        offset = 0
        for name, p in self.params:
            n = int(np.prod(p.shape))
            if p.grad is not None:
                paddle.assign(paddle.to_tensor(averaged[offset:offset + n].reshape(p.shape)), p.grad)
            offset += n
        self.syncs += 1

    def after_step(self, step):
        """diloco mode: start a sync every sync_every steps, apply it overlap_steps later. Returns scalars to log."""
        self._start()
        if self.cfg.mode == "diloco":
            if self.pending is not None and step >= self.pending[0]:
                self._apply()
            if step % self.cfg.sync_every == 0 or step == self.max_steps:
                self._launch(step)
                if self.pending[0] <= step:
                    self._apply()
        return self.stats()

    def stats(self):
        logged = {"wall_time": time.perf_counter() - self.started, "wan_syncs": self.syncs}
        if self.is_leader:
            logged.update(wan_bytes=self.channel.bytes_sent + self.channel.bytes_received, wan_wait_s=self.wait_s, wan_exchange_s=self.exchange_s,
                          wan_scheme=self.scheme, wan_topk_ratio=self.topk_ratio, wan_rtt_s=self.rtt,
                          wan_bandwidth_mbit=self.bandwidth * 8 / 1e6, wan_reconnects=self.channel.reconnects,
                          wan_rejected=len(self.channel.codec.rejected))
        return logged

    # ------------------------------------------------------------------------------------ diloco
    def _launch(self, step):
        local = flatten(self.params)
        delta = self.global_params - local
        holder = {}
        thread = None
        if self.is_leader:
            message, sent = self.compressor.compress(delta)
            meta = {"kind": "pseudo_grad", "step": step, "scheme": self.scheme, "size": self.size}
            thread = threading.Thread(target=self._exchange, args=(meta, message, sent, holder), daemon=True)
            thread.start()
        apply_at = min(step + self.cfg.overlap_steps, self.max_steps)
        self.pending = (apply_at, local, thread, holder)

    def _exchange(self, meta, message, sent, holder):
        """The background sender: runs on the leader while the cluster keeps computing."""
        try:
            begin = time.perf_counter()
            peer_meta, peer = self.channel.exchange(meta, message)
            elapsed = time.perf_counter() - begin
            if peer_meta.get("step") != meta["step"] or peer_meta.get("size") != self.size:
                raise ConfigError(
                    f"the other cluster synced step {peer_meta.get('step')} with {peer_meta.get('size')} values while "
                    f"this one synced step {meta['step']} with {self.size}: both clusters need the same model, "
                    "sync_params, sync_every and max_steps."
                )
            self.exchange_s += elapsed
            # The same sum on both leaders (addition commutes), so the outer steps agree bit for bit.
            averaged = (sent + decompress(peer, self.size)) / 2
            holder["global"] = self.outer.step(self.global_params, averaged)
        except BaseException as error:  # handed to the training thread, which raises it
            holder["error"] = error

    def _apply(self):
        _apply_at, sent_local, thread, holder = self.pending
        self.pending = None
        new_global = np.zeros(self.size, dtype=np.float32)
        if self.is_leader:
            begin = time.perf_counter()
            thread.join()
            self.wait_s += time.perf_counter() - begin
            if "error" in holder:
                raise holder["error"]
            new_global = holder["global"]
        new_global = self._broadcast(new_global)
        local_now = flatten(self.params)
        unflatten_into(new_global + (local_now - sent_local), self.params)
        self.global_params = new_global
        self.syncs += 1
        self._check_cluster_consistent()

    def _check_cluster_consistent(self):
        """Every rank of the cluster must hold the same synced parameters after a sync (data parallel keeps
        them equal bit for bit): compare checksums with one small all-reduce, and stop loudly if not."""
        if self.env.world_size <= 1:
            return
        total = float(flatten(self.params).astype(np.float64).sum())
        extremes = paddle.to_tensor([total, -total], dtype="float64")
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
        high, low = float(extremes[0]), -float(extremes[1])
        if high != low:
            raise RuntimeError(f"after a cross-cluster sync the ranks of this cluster disagree on the synced "
                               f"parameters (checksums {low!r} .. {high!r}): the intra-cluster broadcast failed.")

    def _broadcast(self, vector):
        """The leader's vector on every rank of this cluster (paddle.distributed broadcast; gloo on CPU)."""
        if self.env.world_size <= 1:
            return vector
        tensor = paddle.to_tensor(vector)
        dist.broadcast(tensor, src=0)
        return tensor.numpy()

    def close(self):
        if self.pending is not None:
            self._apply()
        if self.channel is not None:
            self.channel.close()


def build_cross_cluster(cfg, module, env, max_steps):
    """The Engine's cross-cluster hook for Distributed.cross_cluster, or None when it is not enabled."""
    if cfg is None or not cfg.enable:
        return None
    return CrossClusterSync(cfg, module, env, max_steps)
