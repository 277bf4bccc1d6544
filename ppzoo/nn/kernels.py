"""Which Paddle kernels this build registers, for choosing fused paths by capability (never try/except)."""
import functools

import paddle
from paddle.base import core


@functools.lru_cache(maxsize=None)
def _registered():
    return core._get_registered_phi_kernels("function")


def has_kernel(name, place=None, dtype="float32"):
    """True if Paddle has a `name` kernel for `place` ("CPU", "GPU"; default: the current device) and dtype."""
    if place is None:
        place = "GPU" if paddle.device.get_device().startswith("gpu") else "CPU"
    return _has_kernel(name, place, dtype)


@functools.lru_cache(maxsize=None)
def _has_kernel(name, place, dtype):
    # Memoised: callers ask per forward call (RMSNorm), and scanning the kernel keys took ~3 us a time.
    keys = _registered().get(name, [])
    return any(key.startswith(f"({place},") and key.endswith(f", {dtype})") for key in keys)
