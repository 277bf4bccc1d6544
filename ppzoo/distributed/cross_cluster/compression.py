"""Compression of what crosses the WAN: int8 quantization, top-k sparsification, and error feedback.

A compressor maps a float32 vector to a small dict of arrays (the message) and back. Error feedback keeps
what compression dropped and adds it to the next vector before compressing, so nothing is lost for good:
after any number of rounds, sum(sent) + residual == sum(inputs) exactly (up to float rounding). That is
the identity the tests check, and why aggressive top-k still converges.

The scheme is chosen from the link's measured bandwidth (choose_compression): the cheapest one whose
transfer fits the time budget, so a fast link sends exact values and a slow one sends fewer, coarser ones.
"""
import numpy as np

from ppzoo.errors import ConfigError

SCHEMES = ("none", "int8", "topk", "topk_int8")
INT8_BLOCK = 256  # one scale per block: a few large values do not flatten the rest of the vector to zero


def quantize_int8(values):
    """Symmetric per-block int8: (codes int8, scales float32 per block)."""
    n = values.size
    blocks = -(-n // INT8_BLOCK)
    padded = np.zeros(blocks * INT8_BLOCK, dtype=np.float32)
    padded[:n] = values
    padded = padded.reshape(blocks, INT8_BLOCK)
    scales = np.abs(padded).max(axis=1) / 127.0
    safe = np.where(scales > 0, scales, 1.0)
    codes = np.clip(np.rint(padded / safe[:, None]), -127, 127).astype(np.int8)
    return codes.reshape(-1)[:n], scales.astype(np.float32)


def dequantize_int8(codes, scales):
    n = codes.size
    blocks = scales.size
    padded = np.zeros(blocks * INT8_BLOCK, dtype=np.float32)
    padded[:n] = codes.astype(np.float32)
    return (padded.reshape(blocks, INT8_BLOCK) * scales[:, None]).reshape(-1)[:n]


def compress(vector, scheme, topk_ratio):
    """`vector` (float32, 1-D) as a message dict under `scheme`."""
    vector = np.asarray(vector, dtype=np.float32)
    if scheme == "none":
        return {"values": vector}
    if scheme == "int8":
        codes, scales = quantize_int8(vector)
        return {"codes": codes, "scales": scales}
    if scheme in ("topk", "topk_int8"):
        k = max(1, int(round(vector.size * topk_ratio)))
        indices = np.argpartition(np.abs(vector), vector.size - k)[vector.size - k:].astype(np.int32)
        indices.sort()
        values = vector[indices]
        if scheme == "topk":
            return {"indices": indices, "values": values}
        codes, scales = quantize_int8(values)
        return {"indices": indices, "codes": codes, "scales": scales}
    raise ConfigError(f"Unknown compression scheme {scheme!r}; use one of: auto, {', '.join(SCHEMES)}.")


def decompress(message, size):
    """The float32 vector of length `size` a compressed message stands for."""
    if "indices" in message:
        values = message["values"] if "values" in message else dequantize_int8(message["codes"], message["scales"])
        dense = np.zeros(size, dtype=np.float32)
        dense[message["indices"]] = values
        return dense
    if "codes" in message:
        return dequantize_int8(message["codes"], message["scales"])
    return np.asarray(message["values"], dtype=np.float32)


def message_bytes(message):
    return sum(array.nbytes for array in message.values())


class ErrorFeedbackCompressor:
    """Compress with memory: the part of each vector that compression dropped is added to the next one."""

    def __init__(self, size, scheme="none", topk_ratio=0.01):
        self.size = size
        self.scheme = scheme
        self.topk_ratio = topk_ratio
        self.residual = np.zeros(size, dtype=np.float32)

    def compress(self, vector):
        """(message, what the receiver will reconstruct from it)."""
        corrected = np.asarray(vector, dtype=np.float32) + self.residual
        message = compress(corrected, self.scheme, self.topk_ratio)
        sent = decompress(message, self.size)
        self.residual = corrected - sent
        return message, sent


def choose_compression(raw_bytes, bandwidth_bytes_per_s, budget_s, min_topk_ratio=0.001):
    """(scheme, topk_ratio): the least lossy scheme whose message crosses the link within budget_s.

    Sizes: none 4 B/value, int8 ~1 B/value, top-k int8 ~5 B per kept value (int32 index + int8 code).
    """
    if raw_bytes <= bandwidth_bytes_per_s * budget_s:
        return "none", 1.0
    if raw_bytes / 4 <= bandwidth_bytes_per_s * budget_s:
        return "int8", 1.0
    values = raw_bytes / 4
    affordable = bandwidth_bytes_per_s * budget_s / 5
    return "topk_int8", float(max(min_topk_ratio, min(0.5, affordable / values)))
