"""Load a trained checkpoint for inference: its config, tokenizer and weights, on one process.

A checkpoint saved with tensor parallelism (model.mp0..mpN) is merged back to the full layout here, using
each parameter's `mp_split_axis`, so any checkpoint serves on a single device. A Hugging Face LLaMA
directory (config.json + safetensors, no ppzoo manifest) loads too, as a ChuXin model.
"""
import os

import paddle

from ppzoo.config import config_from_dict
from ppzoo.core import checkpoint as ckpt
from ppzoo.data.tokenizer import Tokenizer
from ppzoo.errors import CheckpointError
from ppzoo.models.chuxin import hf_checkpoint
from ppzoo.registry import MODULES


def merged_state_dict(path, module, mp_size):
    """The full-layout state dict of a checkpoint saved with `mp_size` tensor-parallel ranks."""
    shards = [paddle.load(os.path.join(path, f"model.mp{r}.pdparams")) for r in range(mp_size)]
    if mp_size == 1:
        return shards[0]
    axes = {name: getattr(p, "mp_split_axis", None) for name, p in module.named_parameters()}
    merged = {}
    for name, value in shards[0].items():
        axis = axes.get(name)
        merged[name] = value if axis is None else paddle.concat([s[name] for s in shards], axis=axis)
    return merged


def load_checkpoint_for_inference(path):
    """(module in eval mode, tokenizer, config) from a checkpoint directory written by the Engine, or from a
    Hugging Face LLaMA directory."""
    if not os.path.isdir(path):
        raise CheckpointError(
            f"{path} is not a checkpoint directory (expected output_dir/step_XXXXXXXX or a Hugging Face model "
            f"directory)."
        )
    if hf_checkpoint.is_hf_checkpoint(path):
        return hf_checkpoint.load_hf_for_inference(path)
    if not os.path.exists(os.path.join(path, ckpt.MANIFEST)) and ckpt.list_checkpoints(path):
        path = ckpt.resolve_resume("auto", path)  # a run's output directory: its newest checkpoint
    ckpt.verify(path)
    state = ckpt.read_trainer_state(path)
    cfg = config_from_dict(state["config"], source=os.path.join(path, ckpt.TRAINER_STATE))
    tokenizer_file = os.path.join(path, "tokenizer.json")
    tokenizer = Tokenizer.from_file(tokenizer_file) if os.path.exists(tokenizer_file) else None
    module = MODULES.get(cfg.model_module)(cfg.Model, None)
    module.set_state_dict(merged_state_dict(path, module, state.get("mp_size", 1)))
    module.eval()
    return module, tokenizer, cfg


def checkpoint_module_name(path):
    """The registered module a checkpoint (or a run directory's newest) was trained as, or None."""
    return ckpt.module_name(path)
