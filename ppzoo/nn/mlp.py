"""SwiGLU: silu(gate) * up, the LLaMA MLP's activation.

Paddle's CPU kernels for swiglu, silu and sigmoid are single-threaded scalar loops, while tanh is vectorized
(measured on [8, 256, 688]: swiglu 3.9 ms, sigmoid 1.4 ms, tanh 0.6 ms). So on CPU the activation is a
PyLayer built on sigmoid(x) = (1 + tanh(x / 2)) / 2, with its backward written out; on other devices, and
as the reference in tests, it is F.swiglu.
"""
import math

import paddle
import paddle.nn.functional as F
from paddle.autograd import PyLayer


def _sigmoid_by_tanh(x):
    return 0.5 * paddle.tanh(0.5 * x) + 0.5


class _SwiGLUFunction(PyLayer):
    @staticmethod
    def forward(ctx, gate, up):
        sig = _sigmoid_by_tanh(gate)
        silu = gate * sig
        ctx.save_for_backward(gate, up, sig, silu)
        return silu * up

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, sig, silu = ctx.saved_tensor()
        grad_up = grad_out * silu
        # d silu / d gate = sig * (1 + gate * (1 - sig)) = sig + silu * (1 - sig)
        grad_gate = grad_out * up * (sig + silu * (1.0 - sig))
        return grad_gate, grad_up


# Below this many elements the scalar silu kernel beats the four vectorized ops of the tanh form, once
# the PyLayer is out of the way (forward only, one thread): [1, 1, 688] 4.7 vs 11.3 us, [8, 1, 688] 10.6 vs
# 15.9 us, [64, 1, 688] 77 vs 54 us.
_SMALL_FOR_SILU = 16384


def swiglu(gate, up):
    if paddle.device.get_device() != "cpu":
        return F.swiglu(gate, up)
    if paddle.is_grad_enabled():
        return _SwiGLUFunction.apply(gate, up)
    # Forward only (generation): no PyLayer, whose bookkeeping costs about 6 us a call at decode sizes.
    # math.prod, not gate.size: Tensor.size goes through numpy (~5 us).
    if paddle.in_dynamic_mode() and math.prod(gate.shape) <= _SMALL_FOR_SILU:
        return F.silu(gate) * up
    return gate * _sigmoid_by_tanh(gate) * up
