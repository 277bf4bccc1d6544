"""KV caches for incremental decoding.

A cache is an interface so that cache policies (a dense cache, a preallocated one, KCache's offloaded
values, ...) plug into the generation loop without the model knowing. The model's attention hands each
layer's new queries, keys and values to `cache.attend(layer, q, k, v, mask)`, which stores k/v and returns
the attention output; how keys and values are laid out, and how attention reads them, is the cache's
business. The base class does it with `update()` (store, return every key and value so far) and the
plain attention kernel, so a policy that only stores differently implements `update()`; one that must
also read differently (a head-major buffer, values fetched only where the scores need them) overrides
`attend()`. The generation loop calls `cache.advance(n)` after each forward.
"""
import numpy as np
import paddle

from ppzoo.nn.attention import attention, attention_heads_first, heads_first, repeat_kv


class KVCache:
    """Base class: `length` is the number of positions stored before the current forward."""

    def __init__(self):
        self.length = 0

    def update(self, layer_idx, k, v):
        """Store this forward's k/v ([b, s, kv_heads, d]) for a layer; return all keys and values so far
        ([b, length + s, kv_heads, d])."""
        raise NotImplementedError

    def attend(self, layer_idx, q, k, v, additive_mask=None, scale=None):
        """Store this forward's k/v ([b, s, kv_heads, d]) and attend the queries q [b, s, heads, d] over every
        key so far -> [b, s, heads, d]. `additive_mask` [b, 1 or heads, s, length + s] (None: causal);
        `scale` as in ppzoo.nn.attention.attention."""
        keys, values = self.update(layer_idx, k, v)
        n_rep = q.shape[2] // keys.shape[2]
        return attention(q, repeat_kv(keys, n_rep), repeat_kv(values, n_rep), additive_mask=additive_mask,
                         scale=scale)

    def advance(self, num_positions):
        self.length += num_positions

    def reorder(self, batch_indices):
        """Keep only the given rows (e.g. finished sequences dropped from a batch)."""
        raise NotImplementedError


class DenseKVCache(KVCache):
    """All keys and values in memory, appended along the sequence axis (a copy of the whole cache per
    layer and step; PreallocatedKVCache avoids it)."""

    def __init__(self):
        super().__init__()
        self.keys, self.values = {}, {}

    def update(self, layer_idx, k, v):
        if layer_idx in self.keys:
            k = paddle.concat([self.keys[layer_idx], k], axis=1)
            v = paddle.concat([self.values[layer_idx], v], axis=1)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v

    def reorder(self, batch_indices):
        index = paddle.to_tensor(batch_indices, dtype="int64")
        for layer in self.keys:
            self.keys[layer] = paddle.index_select(self.keys[layer], index, axis=0)
            self.values[layer] = paddle.index_select(self.values[layer], index, axis=0)


class PreallocatedKVCache(KVCache):
    """Keys and values written in place into per-layer buffers kept head-major, [b, kv_heads, capacity, d]:
    the layout attention multiplies with, so a decode step copies nothing the size of the cache.

    Why: DenseKVCache copies the whole cache twice per layer and step (the concat that appends a position,
    attention's transpose to head-major); at batch 8 that was 2.5 of tiny ChuXin's 6.9 ms per decode step.
    Here a step writes its one new position into the buffer and attention reads the buffer as it is.

    Attention runs over the whole buffer, unwritten positions masked: this Paddle runs without strided views
    (FLAGS_use_stride_kernel=0, see ppzoo._cpu_defaults), so a slice of the written part would be a copy
    again. Capacity therefore grows `block_size` positions at a time (one copy of the cache per growth), so
    attention spends at most block_size - 1 masked positions' work; the buffers start as zeros, so masked
    positions contribute exactly 0. `max_length` (optional) is a hard limit on the positions stored.
    """

    def __init__(self, block_size=64, max_length=None):
        super().__init__()
        if block_size < 1:
            raise ValueError(f"block_size must be a positive number of positions, got {block_size}")
        self.block_size = block_size
        self.max_length = max_length
        self.keys, self.values = {}, {}  # per layer, [b, kv_heads, capacity, d]
        # The same memory as [b * kv_heads * capacity, d] rows (reshape shares it), for scatter_ (see _write).
        self._key_rows, self._value_rows = {}, {}
        self._row_memo = None  # (length, {(batch * kv_heads, capacity): row indices of this decode step})
        self._mask_memo = None  # (length, source mask, capacity, padded mask) of the current forward

    @property
    def capacity(self):
        return next(iter(self.keys.values())).shape[2] if self.keys else 0

    def _store(self, layer_idx, keys, values):
        self.keys[layer_idx], self.values[layer_idx] = keys, values
        d = keys.shape[-1]
        self._key_rows[layer_idx], self._value_rows[layer_idx] = keys.reshape([-1, d]), values.reshape([-1, d])

    def _grown_capacity(self, end):
        """The capacity that holds `end` positions: whole blocks, at most max_length."""
        capacity = -(-end // self.block_size) * self.block_size
        return min(capacity, self.max_length) if self.max_length is not None else capacity

    @staticmethod
    def _grown(buffer, like, capacity):
        """A head-major buffer [b, kv_heads, capacity, d] (new positions zero): `buffer` extended, or a new one
        shaped after `like` [b, s, kv_heads, d] when there is none yet."""
        b, _, h, d = like.shape
        if buffer is None:
            return paddle.zeros([b, h, capacity, d], dtype=like.dtype)
        tail = paddle.zeros([b, h, capacity - buffer.shape[2], d], dtype=buffer.dtype)
        return paddle.concat([buffer, tail], axis=2)

    def _reserve(self, layer_idx, k, end):
        """Make the layer's buffers hold at least `end` positions (new ones zero)."""
        keys = self.keys.get(layer_idx)
        if keys is not None and end <= keys.shape[2]:
            return
        capacity = self._grown_capacity(end)
        self._store(layer_idx, self._grown(keys, k, capacity), self._grown(self.values.get(layer_idx), k, capacity))

    def _decode_rows(self, batch_heads, capacity):
        """Row indices (into the [b * kv_heads * capacity, d] view) of position `length` of every (row, head):
        the same for every layer of a forward with the same head count, so built once per shape."""
        if self._row_memo is None or self._row_memo[0] != self.length:
            self._row_memo = (self.length, {})
        by_shape = self._row_memo[1]  # keyed by shape: layers may differ in kv heads (e.g. ERNIE Titan)
        rows = by_shape.get((batch_heads, capacity))
        if rows is None:
            rows = by_shape[(batch_heads, capacity)] = paddle.arange(
                self.length, batch_heads * capacity, capacity, dtype="int64")
        return rows

    def _check_room(self, num_new):
        end = self.length + num_new
        if self.max_length is not None and end > self.max_length:
            raise ValueError(f"the cache holds at most {self.max_length} positions; this forward needs {end}")
        return end

    def _put(self, buffer, rows_view, x):
        """Write x [b, s, kv_heads, d] at positions length .. length + s of a head-major buffer (`rows_view`: the
        same memory as [b * kv_heads * capacity, d] rows)."""
        if x.shape[1] == 1:
            # One position: a row scatter into the flat view, which writes in place like the slice
            # assignment below but costs 2.5 instead of 17 us at batch 8 (setitem's index parsing).
            b, _, h, d = x.shape
            paddle.scatter_(rows_view, self._decode_rows(b * h, buffer.shape[2]), x.reshape([-1, d]))
        else:
            buffer[:, :, self.length:self.length + x.shape[1]] = heads_first(x)

    def _write(self, layer_idx, k, v):
        """Store k/v [b, s, kv_heads, d] at positions length .. length + s; return the layer's buffers."""
        self._reserve(layer_idx, k, self._check_room(k.shape[1]))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        self._put(keys, self._key_rows[layer_idx], k)
        self._put(values, self._value_rows[layer_idx], v)
        return keys, values

    def _capacity_mask(self, additive_mask, num_new, capacity):
        """The additive mask over the whole buffer: the given mask [b, 1 or heads, s, length + s] (None:
        causal) with the positions past length + s masked. Built once per forward, shared by the layers."""
        memo = self._mask_memo
        if memo is not None and memo[0] == self.length and memo[1] is additive_mask and memo[2] == capacity:
            return memo[3]
        end = self.length + num_new
        if additive_mask is None:
            keys = np.arange(capacity)[None, :]
            queries = np.arange(self.length, end)[:, None]
            mask = paddle.to_tensor(np.where(keys <= queries, 0.0, -np.inf).astype(np.float32)[None, None])
        elif capacity > end:
            shape = list(additive_mask.shape)
            shape[-1] = capacity - end
            tail = paddle.full(shape, float("-inf"), dtype=additive_mask.dtype)
            mask = paddle.concat([additive_mask, tail], axis=-1)
        else:
            mask = additive_mask
        self._mask_memo = (self.length, additive_mask, capacity, mask)
        return mask

    def update(self, layer_idx, k, v):
        """All keys and values so far in the model's layout [b, length + s, kv_heads, d]. These are copies
        (a slice and a transpose of the buffers): attend() is the fast path, this is for callers that want
        the keys and values themselves."""
        keys, values = self._write(layer_idx, k, v)
        end = self.length + k.shape[1]
        return (keys[:, :, :end].transpose([0, 2, 1, 3]).contiguous(),
                values[:, :, :end].transpose([0, 2, 1, 3]).contiguous())

    def attend(self, layer_idx, q, k, v, additive_mask=None, scale=None):
        keys, values = self._write(layer_idx, k, v)
        mask = self._capacity_mask(additive_mask, q.shape[1], keys.shape[2])
        return attention_heads_first(q, keys, values, mask, scale=scale)

    def reorder(self, batch_indices):
        index = paddle.to_tensor(batch_indices, dtype="int64")
        for layer in list(self.keys):
            self._store(layer, paddle.index_select(self.keys[layer], index, axis=0),
                        paddle.index_select(self.values[layer], index, axis=0))
        self._mask_memo = self._row_memo = None

    def memory_report(self):
        """Bytes the buffers hold (all in fast memory: the compute device's, or Paddle's host memory)."""
        held = sum(int(np.prod(t.shape)) * t.element_size() for t in [*self.keys.values(), *self.values.values()])
        return {"fast_tier_bytes": held, "offloaded_bytes": 0, "dense_cache_bytes": held}


class PassedKVCache(KVCache):
    """The cache as plain tensors passed in and out of an exported (static-graph) forward.

    An exported program keeps no state between calls, so each layer's past keys and values come in as inputs
    and its present ones (past + this forward's positions) go out as outputs, one tensor each per layer,
    head-major ([b, kv_heads, positions, d]) so attention reads them without a transpose. A step copies each
    layer's cache once (the concat appending the new positions; a stateless program cannot write in place).
    Measured on tiny ChuXin: the earlier signature with all layers stacked in one tensor copied the cache
    about five times a step (unbind, concat, transposes, stack).
    """

    def __init__(self, past_keys, past_values):
        super().__init__()
        self.past_keys, self.past_values = list(past_keys), list(past_values)
        self.present_keys, self.present_values = {}, {}

    def _append(self, layer_idx, k, v):
        # Only the new positions are transposed: the past may be empty (prefill), and oneDNN's transpose
        # fails on empty tensors.
        keys = paddle.concat([self.past_keys[layer_idx], heads_first(k)], axis=2)
        values = paddle.concat([self.past_values[layer_idx], heads_first(v)], axis=2)
        self.present_keys[layer_idx], self.present_values[layer_idx] = keys, values
        return keys, values

    def update(self, layer_idx, k, v):
        keys, values = self._append(layer_idx, k, v)
        return keys.transpose([0, 2, 1, 3]), values.transpose([0, 2, 1, 3])

    def attend(self, layer_idx, q, k, v, additive_mask=None, scale=None):
        if additive_mask is None:
            raise ValueError("a PassedKVCache needs the attention mask (the exported program takes it as input)")
        keys, values = self._append(layer_idx, k, v)
        return attention_heads_first(q, keys, values, additive_mask, scale=scale)

    def presents(self):
        """([keys per layer], [values per layer]), each [b, kv_heads, past + s, d], after a forward."""
        layers = sorted(self.present_keys)
        if layers != list(range(len(self.past_keys))):
            raise RuntimeError(f"the forward updated layers {layers} of a {len(self.past_keys)}-layer cache")
        return [self.present_keys[i] for i in layers], [self.present_values[i] for i in layers]

    def reorder(self, batch_indices):
        raise NotImplementedError("a PassedKVCache lives for one forward; reorder its inputs instead")
