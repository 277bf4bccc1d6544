"""RMSNorm.

F.rms_norm is not registered on CPU, and Paddle's fused RMSNorm kernel (fused_rms_norm_quant) has a CPU
forward but no backward. So RMSNorm is a PyLayer: its forward uses the fused kernel where this build has it
for the device and dtype (checked, not tried), else plain ops; its backward is written out, with the row
means and the weight gradient's column sum done as matrix-vector products, which Paddle's CPU reductions
are several times slower at. `rms_norm_reference` is the autograd version tests compare against.
"""
import paddle
import paddle.nn as nn
from paddle.autograd import PyLayer

from ppzoo.nn.kernels import has_kernel


def rms_norm_reference(x, weight, eps):
    x32 = x.astype("float32")
    normed = x32 * paddle.rsqrt((x32 * x32).mean(-1, keepdim=True) + eps)
    return normed.astype(x.dtype) * weight


def _normalize(x, eps):
    """x / sqrt(mean(x^2) + eps) over the last axis, in float32, and 1 / sqrt(...) per row ([..., 1])."""
    x32 = x if x.dtype == paddle.float32 else x.astype("float32")
    ones = paddle.full([x32.shape[-1], 1], 1.0 / x32.shape[-1], dtype="float32")
    inv_rms = paddle.rsqrt(paddle.matmul(x32 * x32, ones) + eps)
    return x32 * inv_rms, inv_rms


def use_fused_rms_norm(x):
    return has_kernel("fused_rms_norm_quant", dtype=str(x.dtype).replace("paddle.", ""))


def _rms_norm_forward(x, weight, eps):
    if use_fused_rms_norm(x):
        from paddle.incubate.nn.functional import fused_rms_norm

        return fused_rms_norm(x, weight, None, eps, x.ndim - 1)[0]
    normed, _ = _normalize(x, eps)
    return normed.astype(x.dtype) * weight


class _RMSNormFunction(PyLayer):
    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return _rms_norm_forward(x, weight, eps)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensor()
        normed, inv_rms = _normalize(x, ctx.eps)
        hidden = x.shape[-1]
        g32 = grad_out.astype("float32")
        g_w = g32 * weight.astype("float32")
        # d/dx of x * r(x), r = (mean(x^2) + eps)^-1/2:  r * (g_w - normed * mean(g_w * normed))
        row_mean = paddle.matmul(g_w * normed, paddle.full([hidden, 1], 1.0 / hidden, dtype="float32"))
        grad_x = (g_w - normed * row_mean) * inv_rms
        rows = (g32 * normed).reshape([-1, hidden])
        grad_w = paddle.matmul(paddle.ones([1, rows.shape[0]], dtype="float32"), rows).reshape([hidden])
        return grad_x.astype(x.dtype), grad_w.astype(weight.dtype)


class RMSNorm(nn.Layer):
    def __init__(self, hidden_size, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = self.create_parameter([hidden_size], default_initializer=nn.initializer.Constant(1.0))

    def forward(self, x):
        if not paddle.is_grad_enabled():
            # Nothing to differentiate (generation runs under no_grad): the forward alone, without the
            # PyLayer's bookkeeping, which costs more than the fused kernel at decode sizes (measured on
            # [1, 1, 256], one thread: 10.0 us through the PyLayer, 3.9 us direct; 9 norms a ChuXin-tiny step).
            return _rms_norm_forward(x, self.weight, self.eps)
        return _RMSNormFunction.apply(x, self.weight, self.eps)
