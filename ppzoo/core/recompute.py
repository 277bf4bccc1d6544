"""Activation recompute applied by the Engine to the layers a Module offers (Module.recompute_units)."""
import paddle
from paddle.distributed.fleet.utils import recompute


def apply_recompute(layers):
    """Make each layer drop its activations in forward and recompute them in backward.

    Only while gradients are being recorded: evaluation and generation run the plain forward."""
    for layer in layers:
        plain_forward = layer.forward

        def forward(*args, _plain=plain_forward, **kwargs):
            if not paddle.is_grad_enabled():
                return _plain(*args, **kwargs)
            return recompute(_plain, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
    return layers
