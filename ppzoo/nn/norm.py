"""RMSNorm in plain Paddle ops.

F.rms_norm is not registered on CPU and fused_rms_norm has no CPU backward, so the layer is written here.
Its backward is written by hand (a PyLayer): autograd over the five elementwise ops of the forward keeps
five intermediates and runs twice as many kernels, measured as one of the largest costs of a CPU training
step. `rms_norm_reference` is the autograd version the tests compare against.
"""
import paddle
import paddle.nn as nn
from paddle.autograd import PyLayer


def rms_norm_reference(x, weight, eps):
    x32 = x.astype("float32")
    normed = x32 * paddle.rsqrt((x32 * x32).mean(-1, keepdim=True) + eps)
    return normed.astype(x.dtype) * weight


class _RMSNormFunction(PyLayer):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x if x.dtype == paddle.float32 else x.astype("float32")
        inv_rms = paddle.rsqrt((x32 * x32).mean(-1, keepdim=True) + eps)
        normed = x32 * inv_rms
        ctx.save_for_backward(normed, inv_rms, weight)
        ctx.input_dtype = x.dtype
        return normed.astype(x.dtype) * weight

    @staticmethod
    def backward(ctx, grad_out):
        normed, inv_rms, weight = ctx.saved_tensor()
        g = grad_out.astype("float32") * weight.astype("float32")
        # d/dx of x * r(x) with r = (mean(x^2) + eps)^-1/2:  r * (g - normed * mean(g * normed))
        grad_x = inv_rms * (g - normed * (g * normed).mean(-1, keepdim=True))
        reduce_axes = list(range(grad_out.ndim - 1))
        grad_w = (grad_out.astype("float32") * normed).sum(axis=reduce_axes).astype(weight.dtype)
        return grad_x.astype(ctx.input_dtype), grad_w


class RMSNorm(nn.Layer):
    def __init__(self, hidden_size, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = self.create_parameter([hidden_size], default_initializer=nn.initializer.Constant(1.0))

    def forward(self, x):
        return _RMSNormFunction.apply(x, self.weight, self.eps)
