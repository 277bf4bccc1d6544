"""Generation, KV-cache policies and loading trained checkpoints for inference."""
from ppzoo.inference.cache import DenseKVCache, KVCache, PreallocatedKVCache
from ppzoo.inference.generate import Generator, SamplingConfig
from ppzoo.inference.loading import load_checkpoint_for_inference
from ppzoo.inference.ring_memory import RingMemoryModel

__all__ = [
    "DenseKVCache", "Generator", "KVCache", "PreallocatedKVCache", "SamplingConfig", "load_checkpoint_for_inference",
    "RingMemoryModel",
]
