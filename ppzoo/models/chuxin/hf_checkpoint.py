"""Hugging Face LLaMA checkpoint directories <-> ChuXinForCausalLM, without PyTorch.

A Hugging Face directory holds `config.json`, the weights as `model.safetensors` or as shards listed in
`model.safetensors.index.json`, and optionally `generation_config.json` and a tokenizer (`tokenizer.json`
with `tokenizer_config.json`). Weights are read with safetensors' numpy backend; numpy has no bfloat16, so
bf16 tensors are read as raw bytes and widened to float32 here (bf16 is the top half of a float32).

Everything about the directory is checked before any weight is read: the architecture and the config
fields ChuXin cannot represent, that every shard exists, that each tensor is where the index says, and
that names and shapes are exactly the ones the config implies. A wrong download or a mismatched config
is a CheckpointError naming the file and tensor, not a Paddle shape error deep in set_value.

Saving writes the same layout (float32) into a temporary directory that is renamed into place, so the
target is either the old content or the complete new checkpoint.
"""
import dataclasses
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import paddle

from ppzoo.core.checkpoint import MANIFEST, fsync_path
from ppzoo.errors import CheckpointError
from ppzoo.models.chuxin.convert import (
    _is_linear,
    chuxin_config_from_hf,
    hf_config_from_chuxin,
    hf_to_ppzoo_state,
    ppzoo_to_hf_state,
)
from ppzoo.models.chuxin.model import ChuXinForCausalLM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_MODEL_TYPES = ("llama",)
# rope types that need no change to the RoPE itself ("default") or only scale positions ("linear").
_PLAIN_ROPE_TYPES = (None, "default")
_LINEAR_ROPE_TYPES = ("linear",)
# Tensors a checkpoint may carry that the model recomputes instead of storing.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Safetensors dtypes we widen to float32 (the model computes in float32).
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_SAFETENSORS_METADATA = {"format": "pt"}  # transformers refuses files without a known format tag
_LISTED = 8  # names shown in an error before "... and N more"


def _names(names):
    names = sorted(names)
    shown = ", ".join(names[:_LISTED])
    return shown + (f" ... and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def _read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"Cannot read {path} ({what}): {exc}. Re-download or re-export the checkpoint.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} ({what}) must be a JSON object, got {type(data).__name__}.")
    return data


def is_hf_checkpoint(directory):
    """Whether `directory` looks like a Hugging Face model directory (has config.json, no ppzoo manifest).

    Weights are not required here: a config.json without them is still reported by load_hf_checkpoint
    with a message about the missing weights, which is more useful than "not a ppzoo checkpoint"."""
    directory = Path(directory)
    return (directory / CONFIG_FILE).is_file() and not (directory / MANIFEST).exists()


# ---------------------------------------------------------------------------------------------------------
# config.json


def _rope_settings(hf_config, path):
    """(rope_theta, rope_position_scale) from either layout: transformers 5 writes `rope_parameters`
    {rope_type, rope_theta, factor}; older versions write top-level `rope_theta` and `rope_scaling`
    {type or rope_type, factor}."""
    params = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise CheckpointError(f"{path}: rope_parameters / rope_scaling must be JSON objects.")
    theta = params.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    rope = {**scaling, **params}
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type in _PLAIN_ROPE_TYPES:
        return float(theta), 1.0
    if rope_type in _LINEAR_ROPE_TYPES:
        factor = rope.get("factor")
        if not isinstance(factor, (int, float)) or factor <= 0:
            raise CheckpointError(f"{path}: linear RoPE scaling needs a positive `factor`, got {factor!r}.")
        # Hugging Face divides positions by `factor`; ChuXin multiplies them by rope_position_scale.
        return float(theta), 1.0 / float(factor)
    raise CheckpointError(
        f"{path} uses RoPE scaling of type {rope_type!r}, which ChuXin does not implement. Supported: no "
        f"scaling (\"default\") or \"linear\" (position interpolation). Loading it anyway would give wrong "
        f"outputs at every position."
    )


def _check_supported(hf_config, path):
    """Refuse configs whose model ChuXin would compute differently (rather than load and be silently wrong)."""
    architectures = hf_config.get("architectures") or []
    model_type = hf_config.get("model_type")
    if not (set(architectures) & set(SUPPORTED_ARCHITECTURES)) and not (
        not architectures and model_type in SUPPORTED_MODEL_TYPES
    ):
        found = ", ".join(architectures) if architectures else f"model_type {model_type!r}"
        raise CheckpointError(
            f"{path} describes a {found} model; ppzoo loads only {', '.join(SUPPORTED_ARCHITECTURES)} "
            f"(model_type {', '.join(SUPPORTED_MODEL_TYPES)}) checkpoints as ChuXin."
        )
    problems = []
    if hf_config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act is {hf_config['hidden_act']!r} (ChuXin uses silu)")
    for key in ("attention_bias", "mlp_bias"):
        if hf_config.get(key):
            problems.append(f"{key} is true (ChuXin's linear layers have no bias)")
    head_dim = hf_config.get("head_dim")
    hidden, heads = hf_config.get("hidden_size"), hf_config.get("num_attention_heads")
    if head_dim is not None and hidden and heads and head_dim * heads != hidden:
        problems.append(f"head_dim {head_dim} x num_attention_heads {heads} != hidden_size {hidden}")
    if problems:
        raise CheckpointError(f"{path} describes a LLaMA variant ChuXin cannot represent: {'; '.join(problems)}.")


def read_hf_config(directory):
    """(config.json as a dict, the ChuXinConfig it describes)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a Hugging Face checkpoint directory needs its config.json.")
    hf_config = _read_json(path, "the model config")
    _check_supported(hf_config, path)
    try:
        config = chuxin_config_from_hf(hf_config)
    except KeyError as exc:
        raise CheckpointError(f"{path} lacks the required key {exc.args[0]!r}.") from None
    theta, scale = _rope_settings(hf_config, path)
    return hf_config, dataclasses.replace(config, rope_theta=theta, rope_position_scale=scale)


def _generation_extras(directory, hf_config):
    """Generation settings: generation_config.json (if present) over the ids config.json carries."""
    path = Path(directory) / GENERATION_CONFIG_FILE
    generation = _read_json(path, "the generation config") if path.is_file() else {}
    extras = {"hf_config": hf_config, "generation_config": generation}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        extras[key] = generation.get(key, hf_config.get(key))
    extras["max_length"] = generation.get("max_length")
    return extras


# ---------------------------------------------------------------------------------------------------------
# Reading safetensors


def _weight_files(directory):
    """{tensor name: file name} of the checkpoint's weights, after checking every listed file exists."""
    directory = Path(directory)
    if (directory / WEIGHTS_FILE).is_file():  # Hugging Face also prefers the single file when both exist
        return {name: WEIGHTS_FILE for name in _header(directory / WEIGHTS_FILE)}
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pth"))
        hint = (f" It has {', '.join(others[:3])}: PyTorch pickles are not read (they can run code); re-save "
                f"with save_pretrained(..., safe_serialization=True).") if others else ""
        raise CheckpointError(f"{directory} has no {WEIGHTS_FILE} and no {INDEX_FILE}.{hint}")
    weight_map = _read_json(index_path, "the shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} has no `weight_map` of tensor names to shard files.")
    by_file = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        if not (directory / file).is_file():
            raise CheckpointError(
                f"Shard {file} listed in {index_path} is missing from {directory}; it should hold "
                f"{len(names)} tensor(s): {_names(names)}. Re-download that file."
            )
    return dict(weight_map)


def _header(path):
    """The safetensors header of `path`: {tensor name: {"dtype", "shape", "data_offsets"}}.

    Parsed here (8-byte little-endian length, then JSON) rather than through safetensors, because the raw
    bf16 reader needs the byte offsets, and shapes are checked before anything is loaded."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > os.path.getsize(path):
                raise ValueError("header length exceeds the file size")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); it may be truncated.") from None
    header.pop("__metadata__", None)
    for entry in header.values():
        entry["data_start"] = 8 + length + entry["data_offsets"][0]
    return header


def _read_bf16(path, entry):
    """A bf16 tensor as float32: the 16 stored bits are the high half of the float32 with the same value."""
    count = int(np.prod(entry["shape"], dtype=np.int64))
    raw = np.fromfile(path, dtype="<u2", count=count, offset=entry["data_start"])
    if raw.size != count:
        raise CheckpointError(f"{path} is truncated: its tensor data ends early.")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])


def _read_tensor(path, handle, name, entry):
    if entry["dtype"] == "BF16":
        return _read_bf16(path, entry)
    return handle.get_tensor(name).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------------------
# Loading


def _hf_shape(name, paddle_shape):
    """The shape Hugging Face stores for a ChuXin parameter: linear weights are [out, in], Paddle's [in, out]."""
    shape = [int(d) for d in paddle_shape]
    return shape[::-1] if _is_linear(name) else shape


def load_hf_weights(model, directory):
    """Fill `model` (a ChuXinForCausalLM of the directory's config) with the directory's weights."""
    from safetensors import safe_open

    directory = Path(directory)
    params = dict(model.named_parameters())
    location = _weight_files(directory)
    headers = {file: _header(directory / file) for file in sorted(set(location.values()))}

    ignored = [n for n in location if n.endswith(_IGNORED_SUFFIXES)]
    if model.config.tie_word_embeddings:
        # Some tied checkpoints store the (identical) head anyway; the model reads the embedding.
        ignored += [n for n in location if n == "lm_head.weight"]
    for name in ignored:
        location.pop(name)
    missing = sorted(set(params) - set(location))
    if missing:
        raise CheckpointError(
            f"{directory} lacks {len(missing)} tensor(s) that its {CONFIG_FILE} implies: {_names(missing)}. "
            f"The weights are incomplete or belong to a different config."
        )
    unexpected = sorted(set(location) - set(params))
    if unexpected:
        files = _names({location[n] for n in unexpected})
        raise CheckpointError(
            f"{directory} ({files}) holds {len(unexpected)} tensor(s) a LlamaForCausalLM with its {CONFIG_FILE} "
            f"does not have: {_names(unexpected)}. The weights belong to a different model or config."
        )
    for name, file in location.items():
        entry = headers[file].get(name)
        if entry is None:
            raise CheckpointError(f"{INDEX_FILE} puts tensor {name} in {file}, but {directory / file} does not hold it.")
        expected = _hf_shape(name, params[name].shape)
        if list(entry["shape"]) != expected:
            raise CheckpointError(
                f"Tensor {name} in {directory / file} has shape {list(entry['shape'])}, but {CONFIG_FILE} implies "
                f"{expected}. The weights do not match the config."
            )
        if entry["dtype"] not in _FLOAT_DTYPES:
            raise CheckpointError(
                f"Tensor {name} in {directory / file} is {entry['dtype']}; only float checkpoints "
                f"({', '.join(_FLOAT_DTYPES)}) load (quantized weights are not supported)."
            )

    # One file open at a time and one tensor converted at a time: peak memory is the model plus one tensor.
    with paddle.no_grad():
        for file in sorted(headers):
            names = [n for n, f in location.items() if f == file]
            if not names:
                continue
            path = directory / file
            with safe_open(str(path), framework="np") as handle:
                for name in names:
                    value = _read_tensor(path, handle, name, headers[file][name])
                    (mapped,) = hf_to_ppzoo_state({name: value}).values()
                    params[name].set_value(mapped)
    return model


def load_hf_checkpoint(directory):
    """(ChuXinForCausalLM in eval mode, ChuXinConfig, extras) from a Hugging Face LLaMA directory.

    `extras` holds the raw `hf_config` and `generation_config` dicts and, taken from generation_config.json
    over config.json, `bos_token_id`, `eos_token_id`, `pad_token_id` (an int, a list or None) and
    `max_length`."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory (expected a Hugging Face model directory).")
    hf_config, config = read_hf_config(directory)
    _weight_files(directory)  # a missing shard is reported before the (possibly slow) model build
    try:
        model = ChuXinForCausalLM(config)
    except ValueError as exc:  # e.g. hidden_size not divisible by the head count
        raise CheckpointError(f"{directory / CONFIG_FILE}: {exc}") from None
    load_hf_weights(model, directory)
    model.eval()
    return model, config, _generation_extras(directory, hf_config)


# ---------------------------------------------------------------------------------------------------------
# Saving


def _shards(state, max_shard_bytes):
    """Split the ordered {name: array} into lists of names of at most max_shard_bytes each (a tensor larger
    than the limit gets a shard of its own, as in Hugging Face)."""
    shards, current, size = [], [], 0
    for name, value in state.items():
        if current and max_shard_bytes is not None and size + value.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += value.nbytes
    if current:
        shards.append(current)
    return shards


def _special_tokens(tokenizer):
    return {
        key: tokenizer.id_to_token(token_id)
        for key, token_id in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id),
                              ("pad_token", tokenizer.pad_id))
        if token_id is not None
    }


def write_tokenizer_files(tokenizer, directory, model_max_length=None):
    """tokenizer.json plus a tokenizer_config.json naming its special tokens (what Tokenizer.from_file and
    Hugging Face read back)."""
    directory = Path(directory)
    tokenizer.save(directory / TOKENIZER_FILE)
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **_special_tokens(tokenizer)}
    if model_max_length is not None:
        tokenizer_config["model_max_length"] = model_max_length
    _write_json(directory / TOKENIZER_CONFIG_FILE, tokenizer_config)


def _write_json(path, data):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _hf_config_dict(config, token_ids):
    hf_config = hf_config_from_chuxin(config)
    # transformers 4 reads torch_dtype, transformers 5 dtype; the weights are written as float32.
    hf_config.update({"torch_dtype": "float32", "dtype": "float32"})
    if config.rope_position_scale != 1.0:
        # The legacy key, which transformers 4 and 5 both read (5 turns it into rope_parameters).
        factor = 1.0 / config.rope_position_scale
        hf_config["rope_scaling"] = {"type": "linear", "rope_type": "linear", "factor": factor}
    hf_config.update(token_ids)
    return hf_config


def _check_target(directory):
    """Refuse to replace anything but a directory that is empty or a model checkpoint: `--out .` must not
    delete a source tree."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise CheckpointError(f"Cannot write a checkpoint to {directory}: it exists and is not a directory.")
    if any(directory.iterdir()) and not (directory / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"Cannot write a checkpoint to {directory}: it is a non-empty directory that is not a Hugging Face "
            f"checkpoint (no {CONFIG_FILE}), and it would be replaced. Choose a new or empty directory."
        )


def save_hf_checkpoint(model, config, directory, tokenizer=None, max_shard_bytes=None, generation_config=None):
    """Write `model` (a single-process ChuXinForCausalLM) as a Hugging Face LlamaForCausalLM directory.

    Files: config.json, model.safetensors (or model-0000i-of-0000n.safetensors shards plus
    model.safetensors.index.json when the weights exceed `max_shard_bytes`), generation_config.json, and
    with a tokenizer tokenizer.json + tokenizer_config.json. `generation_config` entries (e.g. the
    `generation_config` extras of load_hf_checkpoint) override those derived from the tokenizer. An
    existing checkpoint at `directory` is replaced only once the new one is complete. Returns the path."""
    directory = Path(directory).expanduser().absolute()
    _check_target(directory)
    if getattr(model, "mp_group", None) is not None:
        raise CheckpointError(
            "save_hf_checkpoint needs the full model on one process; load the checkpoint with "
            "load_checkpoint_for_inference (which merges tensor-parallel shards) and save that."
        )
    state = {name: value.astype("float32").numpy() for name, value in model.state_dict().items()}
    state = ppzoo_to_hf_state(state)

    token_ids = {}
    if tokenizer is not None:
        token_ids = {key: value for key, value in (("bos_token_id", tokenizer.bos_id),
                                                   ("eos_token_id", tokenizer.eos_id),
                                                   ("pad_token_id", tokenizer.pad_id)) if value is not None}
    generation = {**token_ids, **(generation_config or {})}
    generation.pop("transformers_version", None)  # ours is not a transformers export

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".tmp-{directory.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_json(tmp / CONFIG_FILE, _hf_config_dict(config, {k: v for k, v in generation.items()
                                                                if k.endswith("_token_id")}))
        _write_json(tmp / GENERATION_CONFIG_FILE, generation)
        _write_weights(state, tmp, max_shard_bytes)
        if tokenizer is not None:
            write_tokenizer_files(tokenizer, tmp, config.max_position_embeddings)
        for path in tmp.iterdir():
            fsync_path(path)
        fsync_path(tmp)
        _replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _write_weights(state, directory, max_shard_bytes):
    from safetensors.numpy import save_file

    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(state, str(directory / WEIGHTS_FILE), metadata=_SAFETENSORS_METADATA)
        return
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: state[name] for name in names}, str(directory / file), metadata=_SAFETENSORS_METADATA)
        weight_map.update({name: file for name in names})
    total = sum(value.nbytes for value in state.values())
    _write_json(directory / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _replace_directory(tmp, directory):
    """Rename the finished `tmp` to `directory`. An old checkpoint there is moved aside first and deleted
    after: between the two renames the name is briefly absent, but it never holds a partial checkpoint."""
    if not directory.exists():
        os.rename(tmp, directory)
    else:
        old = directory.parent / f".old-{directory.name}-{os.getpid()}"
        os.rename(directory, old)
        os.rename(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(directory.parent)


# ---------------------------------------------------------------------------------------------------------
# Inference loading (ppzoo.inference.loading dispatches Hugging Face directories here)


def config_dict_for(config, tokenizer_file=None):
    """A ppzoo config dict (for config_from_dict) describing a ChuXin model loaded from elsewhere."""
    return {
        "Model": {"module": "ChuXin", **dataclasses.asdict(config)},
        "Data": {"tokenizer": str(tokenizer_file) if tokenizer_file else None,
                 "seq_len": config.max_position_embeddings},
    }


def load_hf_for_inference(directory):
    """(ChuXinModule in eval mode, Tokenizer or None, Config) from a Hugging Face directory."""
    from ppzoo.config import config_from_dict
    from ppzoo.data.tokenizer import Tokenizer
    from ppzoo.registry import MODULES

    directory = Path(directory).expanduser()
    hf_config, config = read_hf_config(directory)
    tokenizer_file = directory / TOKENIZER_FILE
    cfg = config_from_dict(config_dict_for(config, tokenizer_file if tokenizer_file.is_file() else None),
                           source=str(directory / CONFIG_FILE))
    _weight_files(directory)
    try:
        module = MODULES.get("ChuXin")(cfg.Model, None)
    except ValueError as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {exc}") from None
    load_hf_weights(module.model, directory)
    module.eval()
    tokenizer = None
    if tokenizer_file.is_file():
        tokenizer = Tokenizer.from_file(tokenizer_file)
        # A tokenizer whose files name no end token still stops where the model's generation config says.
        extras = _generation_extras(directory, hf_config)
        for attr, key in (("eos_id", "eos_token_id"), ("bos_id", "bos_token_id")):
            if getattr(tokenizer, attr) is None and isinstance(extras[key], int):
                setattr(tokenizer, attr, extras[key])
        if tokenizer.pad_id is None:
            tokenizer.pad_id = tokenizer.eos_id
    return module, tokenizer, cfg
