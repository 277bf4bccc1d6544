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
