"""Export a causal language model as a Paddle inference program (paddle.jit.save, PIR format).

One program serves both prefill and decode: the past keys/values are inputs and the present ones outputs,
with the batch, new-position and past-position axes dynamic, so prefill is a call with an empty past
(past = 0) and decode a call with one new position.

    inputs   input_ids        [b, s]                      int64
             position_ids     [b, s]                      int64
             attn_mask        [b, 1, s, past + s]         float32  additive (0 = attend, -inf = masked)
             past_key_0 ..    [b, kv_heads, past, d]      float32  one per layer (past_key_{layers - 1})
             past_value_0 ..  [b, kv_heads, past, d]      float32
    outputs  logits           [b, 1, vocab]               float32  the last position only
             present_key_0 .. [b, kv_heads, past + s, d]  float32  one per layer
             present_value_0 ..

Only the last position's logits are returned: generation needs nothing else, and the full [b, s, vocab]
of a long prompt over a large vocabulary would be gigabytes computed and copied for nothing.

The cache is one tensor per layer, head-major (the layout attention multiplies with), so a decode step
copies each layer's cache once: the concat that appends the new position (see PassedKVCache). Format
version 1 stacked all layers into one [layers, b, kv_heads, past, d] tensor, which cost about five copies
of the cache a step (unbind, concat, transposes, stack). Measured on tiny ChuXin (the program's call per
decode step, one thread, 128 to 255 cached positions, best of two runs): 2.4 / 8.7 ms at batch 1 / 8
with version 1, 2.2 / 4.8 ms with this signature.

Tracing needs two export-only adjustments (context managers below, undone afterwards): RoPE's memoised
rotation matrix becomes a program constant, and ppzoo's PyLayers are traced as their forward ops.

Files written to the output directory (built under a temporary name and renamed into place, so a
directory with the final name is complete):

    model.json, model.pdiparams   the program and its weights (paddle.inference.Config(json, pdiparams))
    ppzoo.json                    metadata: format version, the training config, the signature with
                                  input/output names and layouts, cache geometry, file sizes and SHA-256
    tokenizer.json                (+ tokenizer_config.json / special_tokens_map.json from beside the source)
"""
import contextlib
import inspect
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import paddle
import paddle.nn as nn
from paddle.static import InputSpec

from ppzoo.config import config_to_dict
from ppzoo.core.checkpoint import _sha256, fsync_path
from ppzoo.errors import CheckpointError, PpzooError
from ppzoo.inference.cache import PassedKVCache

FORMAT = "ppzoo-exported-causal-lm"
FORMAT_VERSION = 2  # 2: per-layer head-major past/present tensors (1: stacked over layers)
METADATA_FILE = "ppzoo.json"
PROGRAM_PREFIX = "model"  # -> model.json + model.pdiparams
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")

CACHE_LAYOUT = "per layer: [b, kv_heads, positions, head_dim]"


def cache_names(prefix, num_layers):
    """(key names, value names) of one side of the cache: prefix "past" -> past_key_0.., past_value_0.."""
    return ([f"{prefix}_key_{i}" for i in range(num_layers)], [f"{prefix}_value_{i}" for i in range(num_layers)])


def input_names(num_layers):
    keys, values = cache_names("past", num_layers)
    return ["input_ids", "position_ids", "attn_mask", *keys, *values]


def output_names(num_layers):
    keys, values = cache_names("present", num_layers)
    return ["logits", *keys, *values]


def _language_model(module):
    """The causal LM inside an engine Module (module.language_model()), or the LM itself."""
    lm = module.language_model() if hasattr(module, "language_model") else module
    if getattr(lm, "mp_group", None) is not None and lm.mp_group.nranks > 1:
        raise PpzooError(
            "export needs the full (single-process) model; load the checkpoint with "
            "load_checkpoint_for_inference, which merges tensor-parallel shards"
        )
    return lm


class _ExportedForward(nn.Layer):
    """The traced forward: model body with a PassedKVCache, lm head on the last position only. The saved
    program's inputs and outputs are in input_names() / output_names() order."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, position_ids, attn_mask, past_keys, past_values):
        cache = PassedKVCache(past_keys, past_values)  # lists: one tensor per layer
        hidden = self.lm.model(input_ids, position_ids, None, attn_mask, cache)
        last = hidden[:, -1:, :]
        if self.lm.lm_head is None:  # tied embeddings (as ChuXinForCausalLM.forward does it)
            logits = paddle.matmul(last, self.lm.model.embed_tokens.weight, transpose_y=True)
        else:
            logits = self.lm.lm_head(last)
        present_keys, present_values = cache.presents()
        return (logits.astype("float32"), *present_keys, *present_values)


def signature(model_config):
    """The exported program's inputs and outputs: names, dtypes and layouts ("b", "s", "past" dynamic)."""
    c = model_config
    kv = ["b", c.num_kv_heads, "past", c.head_dim]
    kv_out = ["b", c.num_kv_heads, "past+s", c.head_dim]
    inputs = [
        {"name": "input_ids", "dtype": "int64", "shape": ["b", "s"]},
        {"name": "position_ids", "dtype": "int64", "shape": ["b", "s"]},
        {"name": "attn_mask", "dtype": "float32", "shape": ["b", 1, "s", "past+s"],
         "meaning": "additive mask: 0 where a query may attend a key, -inf elsewhere"},
    ]
    past_keys, past_values = cache_names("past", c.num_layers)
    inputs += [{"name": name, "dtype": "float32", "shape": kv, "meaning": f"layer {i}; empty (past = 0) for prefill"}
               for names in (past_keys, past_values) for i, name in enumerate(names)]
    outputs = [
        {"name": "logits", "dtype": "float32", "shape": ["b", 1, c.vocab_size],
         "meaning": "logits of the last input position only"},
    ]
    present_keys, present_values = cache_names("present", c.num_layers)
    outputs += [{"name": name, "dtype": "float32", "shape": kv_out, "meaning": f"layer {i}"}
                for names in (present_keys, present_values) for i, name in enumerate(names)]
    return inputs, outputs


def _input_spec(model_config):
    c = model_config
    kv = [None, c.num_kv_heads, None, c.head_dim]
    past_keys, past_values = cache_names("past", c.num_layers)
    return [
        InputSpec([None, None], "int64", name="input_ids"),
        InputSpec([None, None], "int64", name="position_ids"),
        InputSpec([None, 1, None, None], "float32", name="attn_mask"),
        [InputSpec(kv, "float32", name=name) for name in past_keys],
        [InputSpec(kv, "float32", name=name) for name in past_values],
    ]


@contextlib.contextmanager
def _traceable_rope(head_dim):
    """Swap ppzoo.nn.rope.rotation_matrix for a constant-building version while the program is traced.

    The eager version memoises its matrix in a module-level dict; dy2static's control-flow rewrite fails on
    that global (UndefinedVar), and a traced value stored there would poison later eager calls. So the
    matrix is computed eagerly here, before tracing, and the traced program gets it as a constant. The swap
    is undone on exit, so eager code never sees it."""
    from ppzoo.nn import rope

    original = rope.rotation_matrix
    matrix = original(head_dim, paddle.float32).numpy()

    def constant(dim, dtype):
        if dim != head_dim:
            raise RuntimeError(f"RoPE asked for a {dim}-dim rotation in a model with head_dim {head_dim}")
        return paddle.to_tensor(matrix).astype(dtype)

    paddle.jit.not_to_static(constant)  # plain Python while tracing: it only adds a constant
    rope.rotation_matrix = constant
    try:
        yield
    finally:
        rope.rotation_matrix = original


class _ForwardOnlyContext:
    """A PyLayer's ctx when only its forward is traced: an inference program keeps nothing for backward."""

    def save_for_backward(self, *tensors):
        pass


def _inlined_pylayer_apply(self, *args, **kwargs):
    """StaticPyLayer.apply that traces the PyLayer's forward as ordinary ops.

    ppzoo's CPU kernels (RMSNorm, RoPE, SwiGLU) are PyLayers for their hand-written backward. Traced as
    such, each becomes a `pylayer` op with its own sub-block, which the inference interpreter runs as a
    nested program (measured: ~4% of a tiny-model decode step) and which other inference backends may not
    support. Arguments are bound the way StaticPyLayer.apply binds them."""
    from paddle.jit.dy2static.py_layer import convert_to_static

    bound = inspect.signature(self.dyfunc_self.forward).bind(self.dyfunc_self, *args, **kwargs)
    bound.apply_defaults()
    inputs = list(bound.arguments.values())[1:]  # [0] is the ctx slot
    return convert_to_static(self.orig_forward_fn)(_ForwardOnlyContext(), *inputs)


# Runs as Python while tracing (dy2static would otherwise rewrite the PyLayer class it reads into a
# StaticPyLayer).
paddle.jit.not_to_static(_inlined_pylayer_apply)


@contextlib.contextmanager
def _inline_pylayers():
    """Trace PyLayers as their forward ops (see _inlined_pylayer_apply). This reaches into dy2static's
    StaticPyLayer; if a Paddle version lacks it, PyLayers stay pylayer ops (slower, still correct, and the
    export's self-check still compares the program with the eager model)."""
    try:
        from paddle.jit.dy2static.py_layer import StaticPyLayer, convert_to_static  # noqa: F401
    except ImportError:
        yield
        return
    original = StaticPyLayer.apply
    StaticPyLayer.apply = _inlined_pylayer_apply
    try:
        yield
    finally:
        StaticPyLayer.apply = original


@contextlib.contextmanager
def tracing_context(head_dim=None):
    """The export-only adjustments while a ppzoo model is traced: RoPE's matrix as a constant (when the model
    uses RoPE with `head_dim`), PyLayers as their forward ops, and no .contiguous() warnings."""
    with contextlib.ExitStack() as stack:
        if head_dim is not None:
            stack.enter_context(_traceable_rope(head_dim))
        stack.enter_context(_inline_pylayers())
        stack.enter_context(warnings.catch_warnings())
        # Static-graph values have no .contiguous(); Paddle warns once per call site and returns the value.
        warnings.filterwarnings("ignore", message=".*contiguous.*")
        yield


def trace_and_save(layer, input_spec, path_prefix, head_dim=None):
    """paddle.jit.save of `layer` traced (full graph) with `input_spec` inside tracing_context."""
    with tracing_context(head_dim):
        static = paddle.jit.to_static(layer, input_spec=input_spec, full_graph=True)
        paddle.jit.save(static, path_prefix)


def _trace_and_save(lm, path_prefix):
    trace_and_save(_ExportedForward(lm), _input_spec(lm.config), path_prefix, lm.config.head_dim)


def _eager_reference(lm, feeds):
    """The eager model's last-position logits and per-layer present keys ([b, kv_heads, positions, d]) for
    the same inputs."""
    from ppzoo.inference.cache import DenseKVCache

    layers = lm.config.num_layers
    past_keys, past_values = cache_names("past", layers)
    cache = DenseKVCache()
    if feeds[past_keys[0]].shape[2]:
        for i in range(layers):
            cache.update(i, paddle.to_tensor(feeds[past_keys[i]].transpose(0, 2, 1, 3)),
                         paddle.to_tensor(feeds[past_values[i]].transpose(0, 2, 1, 3)))
        cache.advance(feeds[past_keys[0]].shape[2])
    logits = lm(paddle.to_tensor(feeds["input_ids"]), position_ids=paddle.to_tensor(feeds["position_ids"]),
                attn_mask=paddle.to_tensor(feeds["attn_mask"]), cache=cache)
    keys = [cache.keys[i].numpy().transpose(0, 2, 1, 3) for i in range(layers)]
    return logits[:, -1:, :].astype("float32").numpy(), keys


def _self_check(lm, directory):
    """Run the saved program (a prefill of 5 positions, then one decode step) and compare it with the eager
    model, so an export that Paddle gets wrong fails here instead of generating wrong text later."""
    from ppzoo.inference.predictor import Predictor, causal_mask

    c = lm.config
    predictor = Predictor(directory, threads=1)
    ids = np.random.default_rng(0).integers(0, c.vocab_size, size=(1, 6)).astype(np.int64)
    past_keys, past_values = cache_names("past", c.num_layers)
    present_keys, present_values = cache_names("present", c.num_layers)
    empty = np.zeros((1, c.num_kv_heads, 0, c.head_dim), dtype=np.float32)
    past = {name: empty for name in past_keys + past_values}
    for start, stop in ((0, 5), (5, 6)):
        feeds = {"input_ids": ids[:, start:stop], "position_ids": np.arange(start, stop, dtype=np.int64)[None],
                 "attn_mask": causal_mask(1, stop - start, start), **past}
        out = predictor.run_numpy(feeds)
        want_logits, want_keys = _eager_reference(lm, feeds)
        got_logits = out["logits"]
        scale = max(1.0, float(np.abs(want_logits).max()))
        if got_logits.shape != want_logits.shape or not np.allclose(got_logits, want_logits, atol=1e-3 * scale):
            raise PpzooError(
                f"the exported program's logits {got_logits.shape} differ from the eager model's "
                f"{want_logits.shape}; this Paddle build ({paddle.__version__}) does not export this model correctly"
            )
        for name, want in zip(present_keys, want_keys):
            if out[name].shape != want.shape or not np.allclose(out[name], want, atol=1e-4):
                raise PpzooError("the exported program's present keys differ from the eager model's KV cache")
        past = {p: out[q] for p, q in zip(past_keys + past_values, present_keys + present_values)}


def file_entry(path):
    return {"bytes": os.path.getsize(path), "sha256": _sha256(path)}


def write_tokenizer(tokenizer, directory):
    tokenizer.save(os.path.join(directory, TOKENIZER_FILE))
    written = [TOKENIZER_FILE]
    source = getattr(tokenizer, "source", None)
    if source:
        # The special-token files decide bos/eos/pad ids when the vocabulary's names alone would not.
        for name in TOKENIZER_SIDE_FILES:
            side = Path(source).parent / name
            if side.is_file():
                shutil.copyfile(side, os.path.join(directory, name))
                written.append(name)
    return written


def prepare_destination(out_dir):
    """Refuse to replace a directory that is not an earlier export (it may hold anything)."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise PpzooError(f"{out_dir} is a file; give a directory for the exported model")
        contents = set(os.listdir(out_dir))
        if contents and METADATA_FILE not in contents:
            raise PpzooError(
                f"{out_dir} already holds files and is not an exported ppzoo model; choose an empty or new directory"
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)


def move_into_place(tmp, out_dir):
    """Rename the finished temporary directory to out_dir, replacing an earlier export there."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    fsync_path(str(out_dir.parent))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_language_model(module, cfg, tokenizer, out_dir, check=True):
    """Export `module`'s causal LM (ppzoo Module or the LM itself) with its config and tokenizer to `out_dir`.

    `cfg` is the run's Config (stored in ppzoo.json as config_to_dict). With check=True the saved program
    is run once and compared with the eager model. Returns {file name: size in bytes} of what was written.
    """
    if tokenizer is None:
        raise PpzooError("export needs the model's tokenizer (the checkpoint has no tokenizer.json)")
    lm = _language_model(module)
    dtypes = {str(p.dtype) for p in lm.parameters()}
    if dtypes != {"paddle.float32"}:
        raise PpzooError(f"export supports float32 weights; the model has {sorted(dtypes)}")
    out_dir = Path(out_dir).expanduser().resolve()
    prepare_destination(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    was_training = lm.training
    lm.eval()
    try:
        _trace_and_save(lm, str(tmp / PROGRAM_PREFIX))
        program_files = [f"{PROGRAM_PREFIX}.json", f"{PROGRAM_PREFIX}.pdiparams"]
        missing = [name for name in program_files if not (tmp / name).is_file()]
        if missing:
            raise RuntimeError(f"paddle.jit.save did not write {missing} (wrote {sorted(os.listdir(tmp))})")
        tokenizer_files = write_tokenizer(tokenizer, str(tmp))
        model_config = lm.config
        inputs, outputs = signature(model_config)
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "paddle_version": paddle.__version__,
            "program": {"model": program_files[0], "params": program_files[1]},
            "tokenizer": tokenizer_files,
            "config": config_to_dict(cfg),
            "cache": {"num_layers": model_config.num_layers, "num_kv_heads": model_config.num_kv_heads,
                      "head_dim": model_config.head_dim, "layout": CACHE_LAYOUT},
            "logits": "last_position",
            "inputs": inputs,
            "outputs": outputs,
        }
        # Paddle names a saved program's outputs fetch_name_0, 1, .. in return order; the Predictor checks
        # these names exist and the self-check that they carry what they claim.
        for i, output in enumerate(outputs):
            output["fetch_name"] = f"fetch_name_{i}"
        write_metadata(tmp, metadata, program_files + tokenizer_files)
        if check:
            with paddle.no_grad():
                _self_check(lm, str(tmp))
        for name in os.listdir(tmp):
            fsync_path(str(tmp / name))
        written = {name: os.path.getsize(tmp / name) for name in sorted(os.listdir(tmp))}
        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if was_training:
            lm.train()
    return written


def write_metadata(directory, metadata, files):
    metadata["files"] = {name: file_entry(os.path.join(directory, name)) for name in files}
    with open(os.path.join(directory, METADATA_FILE), "w") as f:
        json.dump(metadata, f, indent=1)
        f.write("\n")


def exported_format(model_dir):
    """The format recorded in model_dir/ppzoo.json, or None when there is no readable one (the loader of the
    format asked for then reports what is wrong). Tools use it to pick the loader."""
    path = os.path.join(str(model_dir), METADATA_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return metadata.get("format") if isinstance(metadata, dict) else None


def read_metadata(model_dir, format=FORMAT, format_version=FORMAT_VERSION,
                  required=("program", "files", "config", "cache", "inputs", "outputs")):
    """ppzoo.json of an exported model, checked for format, version and the `required` entries (by default
    the language-model export's; other exporters pass their own); CheckpointError names the file."""
    model_dir = str(model_dir)
    path = os.path.join(model_dir, METADATA_FILE)
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"{model_dir} is not a directory (expected an exported model from tools/export.py)")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: {model_dir} is not a model exported by tools/export.py")
    try:
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path} is unreadable ({err}); export the model again") from None
    if not isinstance(metadata, dict) or metadata.get("format") != format:
        raise CheckpointError(f"{path} does not describe a model of format {format!r} (it records "
                              f"{metadata.get('format') if isinstance(metadata, dict) else None!r})")
    if metadata.get("format_version") != format_version:
        raise CheckpointError(
            f"{path} has format version {metadata.get('format_version')}; this ppzoo reads version "
            f"{format_version}. Export the model again with this version of tools/export.py"
        )
    for key in required:
        if key not in metadata:
            raise CheckpointError(f"{path} lacks the {key!r} entry; export the model again")
    return metadata


def verify_files(model_dir, metadata, checksums=True):
    """Every file listed in the metadata is present with its size (and SHA-256 unless checksums=False).

    Checked before Paddle reads anything: a truncated program or weight file can crash Paddle's C++ loader
    instead of raising a Python error."""
    for name, entry in metadata["files"].items():
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing; export the model again")
        if os.path.getsize(path) != entry.get("bytes") or (checksums and _sha256(path) != entry.get("sha256")):
            raise CheckpointError(
                f"{path} does not match its size/checksum in {METADATA_FILE} (truncated or corrupt); "
                "export the model again"
            )
