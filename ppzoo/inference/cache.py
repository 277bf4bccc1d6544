"""KV caches for incremental decoding.

A cache is an interface so that cache policies (a dense cache, KCache's offloaded values, ...) plug into
the generation loop without the model knowing: the model's attention calls `cache.update(layer, k, v)` and
attends over what it returns; the generation loop calls `cache.advance(n)` after each forward.
"""
import paddle


class KVCache:
    """Base class: `length` is the number of positions stored before the current forward."""

    def __init__(self):
        self.length = 0

    def update(self, layer_idx, k, v):
        """Store this forward's k/v ([b, s, kv_heads, d]) for a layer; return all keys and values so far."""
        raise NotImplementedError

    def advance(self, num_positions):
        self.length += num_positions

    def reorder(self, batch_indices):
        """Keep only the given rows (e.g. finished sequences dropped from a batch)."""
        raise NotImplementedError


class DenseKVCache(KVCache):
    """All keys and values in memory, appended along the sequence axis."""

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


class StackedKVCache(KVCache):
    """The cache as plain tensors, for an exported (static-graph) forward.

    An exported program cannot keep state between calls, so the past keys and values come in as inputs,
    stacked over layers as [layers, b, kv_heads, past, d], and this cache hands each layer's slice to the
    model's attention; update() appends the new positions and records the result, which the exported
    forward returns as its present keys/values (`presents()`, [layers, b, kv_heads, past + s, d]).

    The stacked layout is head-major (kv_heads before positions), unlike the [b, s, kv_heads, d] the model
    passes to update(): concatenating along the position axis of the head-major layout needs a transpose
    of only the new positions, and a zero-length past (prefill) is never transposed (oneDNN's transpose
    fails on empty tensors).
    """

    def __init__(self, past_keys, past_values):
        super().__init__()
        # unbind rather than past_keys[i]: Paddle's static slice keeps the indexed axis of an empty tensor
        # ([1, b, h, 0, d] instead of [b, h, 0, d]), which concat then rejects.
        self.past_keys = paddle.unbind(past_keys, axis=0)
        self.past_values = paddle.unbind(past_values, axis=0)
        self.present_keys, self.present_values = {}, {}

    def update(self, layer_idx, k, v):
        keys = paddle.concat([self.past_keys[layer_idx], k.transpose([0, 2, 1, 3])], axis=2)
        values = paddle.concat([self.past_values[layer_idx], v.transpose([0, 2, 1, 3])], axis=2)
        self.present_keys[layer_idx], self.present_values[layer_idx] = keys, values
        return keys.transpose([0, 2, 1, 3]), values.transpose([0, 2, 1, 3])

    def presents(self):
        """(keys, values), each [layers, b, kv_heads, past + s, d], after a forward has updated every layer."""
        layers = sorted(self.present_keys)
        if layers != list(range(len(self.past_keys))):
            raise RuntimeError(f"the forward updated layers {layers} of a {len(self.past_keys)}-layer cache")
        return (paddle.stack([self.present_keys[i] for i in layers]),
                paddle.stack([self.present_values[i] for i in layers]))

    def reorder(self, batch_indices):
        raise NotImplementedError("a StackedKVCache lives for one forward; reorder its inputs instead")
