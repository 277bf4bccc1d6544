"""Generation, KV-cache policies and loading trained checkpoints for inference."""
from ppzoo.inference.cache import DenseKVCache, KVCache
from ppzoo.inference.generate import Generator, SamplingConfig
from ppzoo.inference.loading import load_checkpoint_for_inference

__all__ = ["DenseKVCache", "Generator", "KVCache", "SamplingConfig", "load_checkpoint_for_inference"]
