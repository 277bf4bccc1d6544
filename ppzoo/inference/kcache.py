"""KCache: keys stay in fast memory, values move to a slower tier, and a decode step fetches only the values
its attention weights most.

From the KCache paper (He et al., "Efficient LLM Inference with KCache", 2024): prefill runs as usual; its
values then live in the slow tier while the keys stay in fast memory. At each decode step every query head
scores all cached keys and takes the softmax as usual, keeps its top-N positions, fetches only those value
rows and returns the weighted sum of them (optionally with the N weights renormalized to sum to 1). No
training. The fast tier then holds the keys (half the cache) and N rows per head, so a fixed fast-memory
budget fits about twice the batch, which is where the paper's throughput gain comes from.

KCache is a cache policy behind ppzoo.inference.cache.KVCache, so every decoder that attends through
`cache.attend` gets it without a change:

    from ppzoo.inference.kcache import KCacheConfig, cache_factory
    generator = Generator(model, tokenizer, cache_factory=cache_factory(KCacheConfig(top_n=64)))

Tiers. Keys (and both keys and values of the first `dense_layers` layers, kept dense) are Paddle tensors
laid out as PreallocatedKVCache lays them out (head-major buffers written in place). Values of the other
layers go to an OffloadedValues pool per layer: a memory-mapped temporary file, position-major so that it
grows by appending and one decode step's row is one contiguous write. The selection and the gathering of
the selected rows happen on the host. On a GPU (an explicit capability check) the rows then go through
pinned host memory with an asynchronous copy to the device, where the weighted sum is taken; on a CPU the
host is the compute device and takes the weighted sum where the rows are. `memory_report()` gives the bytes
each tier holds (the fetched rows count as fast memory) and what a dense cache of the same shapes would hold.

On a CPU both tiers are the same DRAM, so the value rows KCache does not read save about what selecting
and gathering the others costs: what it buys there is the batch a fast-memory budget fits (see README,
KCache, for measurements).

A forward of more than one position per row (a prefill, a prefill chunk) is not a decode step: it attends
densely, reading the values it needs back from the slow tier.
"""
import math
import tempfile
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import paddle

from ppzoo.errors import ConfigError
from ppzoo.inference.cache import PreallocatedKVCache
from ppzoo.nn.attention import _softmax, attention_heads_first


@dataclass
class KCacheConfig:
    """`top_n`: value rows each query head fetches per decode step, as a count (int >= 1) or as a fraction of
    the positions cached so far (float in (0, 1]). `dense_layers`: the first this many layers keep an
    ordinary dense cache. `renormalize`: rescale the N selected weights to sum to 1 (the paper uses them as
    the softmax gave them). `offload_dir`: where the value files go (None: the system's temporary directory).

    Defaults as measured on tiny ChuXin (256-token validation windows, `tools/eval.py --task kcache`): an
    eighth of the positions costs +8.5% decode perplexity with every layer on KCache and +0.32% with the
    first layer dense, whose attention is the diffuse one.
    """

    enabled: bool = True
    top_n: Union[int, float] = 0.125
    dense_layers: int = 1
    renormalize: bool = False
    block_size: int = 64
    offload_dir: Optional[str] = None

    def __post_init__(self):
        top_n = self.top_n
        if isinstance(top_n, bool) or not isinstance(top_n, (int, float)):
            raise ConfigError(f"KCache top_n must be a count (int >= 1) or a fraction (float in (0, 1]), got {top_n!r}")
        if isinstance(top_n, int) and top_n < 1:
            raise ConfigError(f"KCache top_n={top_n}: a count of value rows must be at least 1")
        if isinstance(top_n, float) and not 0.0 < top_n <= 1.0:
            raise ConfigError(f"KCache top_n={top_n}: a fraction of the positions must lie in (0, 1]; for a count "
                              "of rows give an int")
        if isinstance(self.dense_layers, bool) or not isinstance(self.dense_layers, int) or self.dense_layers < 0:
            raise ConfigError(f"KCache dense_layers must be a number of layers >= 0, got {self.dense_layers!r}")
        if self.block_size < 1:
            raise ConfigError(f"KCache block_size must be a positive number of positions, got {self.block_size}")

    def num_selected(self, positions):
        """Rows fetched per head when `positions` positions are cached (the current one included)."""
        if isinstance(self.top_n, int):
            return min(self.top_n, positions)
        return min(positions, max(1, math.ceil(self.top_n * positions)))

    def describe(self):
        n = f"{self.top_n}" if isinstance(self.top_n, int) else f"{self.top_n:g} of the positions"
        layers = f"{self.dense_layers} layer{'s' if self.dense_layers > 1 else ''}"
        extra = f", first {layers} dense" if self.dense_layers else ""
        return f"KCache top-{n}{extra}{', renormalized' if self.renormalize else ''}"


def parse_top_n(text):
    """top_n from a command line: "64" is a count, "0.125" a fraction of the positions."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"KCache top_n {text!r} is neither a count (e.g. 64) nor a fraction (e.g. 0.125)") from None


def cache_factory(config=None):
    """The cache policy a KCacheConfig asks for, as a Generator cache_factory: KCache when the config is
    given and enabled, else the dense PreallocatedKVCache."""
    if config is None or not config.enabled:
        return PreallocatedKVCache
    return lambda: KCache(config)


_NUMPY_DTYPES = {paddle.float32: np.float32, paddle.float16: np.float16}


def _nbytes(tensor):
    return int(np.prod(tensor.shape)) * tensor.element_size()


def offload_to_device_is_async():
    """Whether values reach the compute device through pinned memory with an asynchronous copy: on a CUDA
    build computing on a GPU. On a CPU the fast tier is Paddle's host memory and a copy is a plain copy."""
    return paddle.is_compiled_with_cuda() and paddle.get_device().startswith("gpu")


def to_fast_tier(array):
    """A host numpy array as a tensor on the compute device."""
    if offload_to_device_is_async():
        # Staged in page-locked memory so the host-to-device copy can run asynchronously; the matmul that
        # reads it is queued on the same stream, so it waits for the copy without blocking the host.
        return paddle.to_tensor(array, place=paddle.CUDAPinnedPlace()).cuda(blocking=False)
    return paddle.to_tensor(array)


class OffloadedValues:
    """One layer's values in the slow tier: a position-major pool [capacity, b, kv_heads, d] in a memory-
    mapped temporary file (deleted when the pool is dropped).

    Position-major so that growing the capacity only appends to the file (the rows already written stay
    where they are), and one decode step's row of every sequence and head is one contiguous write. Pages of
    the file belong to the operating system's page cache, not to the process's or Paddle's memory: under
    memory pressure they go to disk, which is what a slower tier is.
    """

    def __init__(self, batch, kv_heads, head_dim, dtype, directory=None):
        if dtype not in _NUMPY_DTYPES:
            raise ConfigError(f"KCache offloads float32 or float16 values; this model computes in {dtype}. Run it in "
                              "one of those, or disable KCache.")
        self.paddle_dtype, self.directory = dtype, directory
        self.dtype = np.dtype(_NUMPY_DTYPES[dtype])
        self.row_shape = (batch, kv_heads, head_dim)
        self._file = tempfile.TemporaryFile(prefix="kcache_values_", dir=directory)
        self.array = None
        self.capacity = 0

    @property
    def nbytes(self):
        return self.capacity * int(np.prod(self.row_shape)) * self.dtype.itemsize

    def reserve(self, capacity):
        """Hold at least `capacity` positions (new ones zero: a grown file reads as zeros)."""
        if capacity <= self.capacity:
            return
        self._file.truncate(capacity * int(np.prod(self.row_shape)) * self.dtype.itemsize)
        self.array = np.memmap(self._file, dtype=self.dtype, mode="r+", shape=(capacity, *self.row_shape))
        self.capacity = capacity

    def write(self, start, values):
        """Store values [b, s, kv_heads, d] (numpy) at positions start .. start + s."""
        self.array[start:start + values.shape[1]] = values.transpose(1, 0, 2, 3)

    def read(self, end):
        """Positions 0 .. end head-major, [b, kv_heads, end, d]."""
        return np.ascontiguousarray(self.array[:end].transpose(1, 2, 0, 3))

    def gather(self, positions):
        """The rows at `positions` [b, kv_heads, r, n] (per sequence and KV head) -> [b, kv_heads, r, n, d].

        As np.take of flat row numbers from the pool viewed as [capacity * b * kv_heads, d] rows: half the time
        of the equivalent fancy index array[positions, rows, heads] (0.09 against 0.20 ms for batch 7, 4
        heads, 264 rows each), which broadcasts three index arrays."""
        b, kv_heads, d = self.row_shape
        first_rows = (np.arange(b)[:, None] * kv_heads + np.arange(kv_heads)[None, :])[:, :, None, None]
        flat = np.take(self.array.reshape(-1, d), (positions * (b * kv_heads) + first_rows).reshape(-1), axis=0)
        return flat.reshape(*positions.shape, d)

    def select_rows(self, batch_indices):
        """A new pool holding only the given sequences (same capacity)."""
        pool = OffloadedValues(len(batch_indices), self.row_shape[1], self.row_shape[2], self.paddle_dtype,
                               self.directory)
        pool.reserve(self.capacity)
        pool.array[:] = self.array[:, np.asarray(batch_indices)]
        return pool


def top_n_positions(probs, n):
    """Indices of the n largest weights along the last axis of `probs` (softmax output: >= 0), in no order.

    Selection happens on the host, where the value rows are gathered. Measured on this project's CPU for
    16 heads x 2112 positions: paddle.topk 1.1 ms, numpy's argpartition 0.25 ms, and this 0.16 ms: the n-th
    largest weight per row by a value-only partition of the weights' bit patterns (for non-negative floats
    they order as the floats do, and integer compares are cheaper), then the positions at or above it.
    When weights tie at that threshold (typically zeros: unwritten or masked positions, once n exceeds the
    positions that weigh anything) a row would have more than n, and argpartition decides instead."""
    bits = probs.view(np.int32)
    kth = np.partition(bits, -n, axis=-1)[..., -n:][..., :1]
    above = np.flatnonzero(bits >= kth)
    if above.size != probs.size // probs.shape[-1] * n:
        return np.argpartition(probs, -n, axis=-1)[..., -n:]
    # flatnonzero walks the rows in order, so each row's n positions are consecutive.
    return (above % probs.shape[-1]).reshape(*probs.shape[:-1], n)


class KCache(PreallocatedKVCache):
    """The KCache policy (see the module docstring). Layers below `config.dense_layers` are exactly
    PreallocatedKVCache; the others keep their keys here and their values in an OffloadedValues pool."""

    def __init__(self, config=None):
        config = config or KCacheConfig()
        super().__init__(block_size=config.block_size)
        self.config = config
        self.offloaded = {}  # layer -> OffloadedValues
        self.fetched_peak_bytes = 0  # the largest set of selected value rows (and weights) one step brought in

    def _is_dense(self, layer_idx):
        return layer_idx < self.config.dense_layers

    def _reserve(self, layer_idx, k, end):
        if self._is_dense(layer_idx):
            return super()._reserve(layer_idx, k, end)
        keys = self.keys.get(layer_idx)
        if keys is not None and end <= keys.shape[2]:
            return
        capacity = self._grown_capacity(end)
        keys = self._grown(keys, k, capacity)
        self.keys[layer_idx], self._key_rows[layer_idx] = keys, keys.reshape([-1, keys.shape[-1]])
        if layer_idx not in self.offloaded:
            b, _, h, d = k.shape
            self.offloaded[layer_idx] = OffloadedValues(b, h, d, k.dtype, self.config.offload_dir)
        self.offloaded[layer_idx].reserve(capacity)

    def _write_offloaded(self, layer_idx, k, v):
        """Store keys in the fast tier, values in the slow one; return (keys buffer, values pool, end)."""
        end = self._check_room(k.shape[1])
        self._reserve(layer_idx, k, end)
        keys = self.keys[layer_idx]
        self._put(keys, self._key_rows[layer_idx], k)
        values = self.offloaded[layer_idx]
        values.write(self.length, v.numpy())
        return keys, values, end

    def update(self, layer_idx, k, v):
        if self._is_dense(layer_idx):
            return super().update(layer_idx, k, v)
        keys, values, end = self._write_offloaded(layer_idx, k, v)
        return (keys[:, :, :end].transpose([0, 2, 1, 3]).contiguous(),
                to_fast_tier(values.read(end).transpose(0, 2, 1, 3)))

    def attend(self, layer_idx, q, k, v, additive_mask=None, scale=None):
        if self._is_dense(layer_idx):
            return super().attend(layer_idx, q, k, v, additive_mask, scale)
        keys, values, end = self._write_offloaded(layer_idx, k, v)
        if q.shape[1] > 1:
            # Prefill: attention as usual over every value so far, read back from the slow tier. Keys and the
            # mask are cut to the written positions (capacity=end: the given mask itself, or causal).
            mask = self._capacity_mask(additive_mask, q.shape[1], end)
            return attention_heads_first(q, keys[:, :, :end], to_fast_tier(values.read(end)), mask, scale=scale)
        mask = self._capacity_mask(additive_mask, 1, keys.shape[2])
        return self._attend_top_n(q, keys, values, mask, scale, end)

    def _attend_top_n(self, q, keys, values, mask, scale, positions):
        """One decode step: q [b, 1, heads, d] against every key, the top-N value rows of each head -> [b, 1,
        heads, d]. `positions`: how many are cached (the current one included)."""
        h, d = q.shape[2], q.shape[3]
        kv_heads = keys.shape[1]
        n_rep = h // kv_heads
        scale = d ** -0.5 if scale is None else scale
        qt = q.reshape([0, kv_heads, n_rep, d])  # query head j uses KV head j // n_rep (as attention_heads_first)
        if scale != 1.0:
            qt = qt * scale
        scores = paddle.matmul(qt, keys, transpose_y=True)  # [b, kv_heads, n_rep, capacity]
        if n_rep > 1 and mask.shape[1] == h:
            mask = mask.reshape([0, kv_heads, n_rep, 0])
        probs = _softmax(scores + mask, paddle.float32).numpy()
        selected = top_n_positions(probs, self.config.num_selected(positions))
        weights = np.take_along_axis(probs, selected, axis=-1)
        if self.config.renormalize:
            weights /= weights.sum(axis=-1, keepdims=True)
        rows = values.gather(selected)  # [b, kv_heads, n_rep, n, d]
        self.fetched_peak_bytes = max(self.fetched_peak_bytes, rows.nbytes + weights.nbytes)
        weights = weights[..., None, :].astype(rows.dtype)
        if offload_to_device_is_async():
            out = paddle.matmul(to_fast_tier(weights), to_fast_tier(rows))  # [b, kv_heads, n_rep, 1, d]
        else:
            # The host computes: the gathered rows already sit in its memory, and copying them into a Paddle
            # tensor to multiply there would copy the same bytes again (batch 7, 260 rows per head: 0.14 ms
            # against 0.04 ms for numpy's product and a copy of the [b, heads, d] result).
            out = paddle.to_tensor(np.matmul(weights, rows))
        return out.reshape([0, 1, h, d])

    def reorder(self, batch_indices):
        index = paddle.to_tensor(batch_indices, dtype="int64")
        for layer in list(self.keys):
            keys = paddle.index_select(self.keys[layer], index, axis=0)
            if self._is_dense(layer):
                self._store(layer, keys, paddle.index_select(self.values[layer], index, axis=0))
            else:
                self.keys[layer], self._key_rows[layer] = keys, keys.reshape([-1, keys.shape[-1]])
                self.offloaded[layer] = self.offloaded[layer].select_rows(batch_indices)
        self._mask_memo = self._row_memo = None

    def memory_report(self):
        """Bytes held per tier now, and what a dense cache of the same shapes would hold in fast memory:
        fast_tier_bytes (keys, dense layers' values, and the largest set of fetched rows a step held),
        offloaded_bytes (the value files), dense_cache_bytes."""
        keys = sum(_nbytes(t) for t in self.keys.values())
        dense_values = sum(_nbytes(t) for t in self.values.values())
        return {
            "fast_tier_bytes": keys + dense_values + self.fetched_peak_bytes,
            "fetched_peak_bytes": self.fetched_peak_bytes,
            "offloaded_bytes": sum(pool.nbytes for pool in self.offloaded.values()),
            "dense_cache_bytes": 2 * keys,
        }
