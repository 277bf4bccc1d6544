"""Export the model families beside ChuXin (ppzoo.inference.export) and HelixFold (folding_export) as Paddle
inference programs, and run them behind the same interfaces as their eager models.

An exported family model is a directory of one or more traced programs (each <name>.json + <name>.pdiparams)
with ppzoo.json recording the format, the family's `kind`, the training config, and per program its input
and output names in order. `load_exported` (ppzoo.inference.predictor) reads the kind and returns the
family's exported model:

    kind          programs                                                  loaded as
    recycle_gpt   base:     input_ids, position_ids, attn_mask, past cache  ExportedRecycleGPT (the decoding
                            -> hidden states [b, s, hidden], present cache  interface RecycleGenerator uses:
                  head:     hidden [n, hidden] -> logits [n, vocab]         base_step, logits, recycle_step;
                  recycler: recycled [b, s, hidden], input_ids,             .lm for the plain Generator)
                            position_ids, attn_mask, its own past cache
                            -> last position's logits [b, vocab], present cache
    moe_gpt       model:    input_ids -> logits [b, s, vocab] (no cache)    ExportedMoEGPT
    ernie_titan   model:    the generator's step with its cache             ExportedTitanLM (for Generator)
    ernie_vilg    t2i_start/t2i_step, i2t_start/i2t_step, vq_decoder,       ExportedViLG (sample_codes,
                  vq_encoder                                                caption_greedy, decode_codes, ..)

(each family's section below gives its signature). tools/export.py picks the exporter by the checkpoint's
Model.module (EXPORTERS); with check=True every export runs its programs once against the eager model.

Caches are passed in and out as in ChuXin's export (past_key_i/past_value_i in, present_* out; per layer,
head-major [b, kv_heads, positions, d] through PassedKVCache for RecycleGPT and Titan, ViLG's own
positions-first layout for ViLG), carried between calls by an ExportedKVCache (ViLG: lists of tensors). Every program's outputs are copied out of the
predictor's buffers (which its next run may overwrite in place; ExportedLanguageModel avoids that copy for
ChuXin with two predictors taking turns, which this simpler path does not do).

Each program holds its own copy of the weights it reads (the head's and the embedding are in two programs
for RecycleGPT): paddle.jit.save writes a program's parameters beside it.
"""
import os
import shutil
from pathlib import Path

import numpy as np
import paddle
import paddle.nn as nn
from paddle.static import InputSpec

from ppzoo.config import config_from_dict, config_to_dict
from ppzoo.data.tokenizer import Tokenizer
from ppzoo.errors import CheckpointError, PpzooError
from ppzoo.inference.cache import PassedKVCache
from ppzoo.inference.export import (
    METADATA_FILE, TOKENIZER_FILE, cache_names, exported_format, move_into_place, prepare_destination,
    read_metadata, trace_and_save, verify_files, write_metadata, write_tokenizer,
)

FORMAT = "ppzoo-exported-family"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------- shared pieces
def _cache_spec(prefix, num_layers, num_kv_heads, head_dim):
    keys, values = cache_names(prefix, num_layers)
    shape = [None, num_kv_heads, None, head_dim]
    return ([InputSpec(shape, "float32", name=n) for n in keys], [InputSpec(shape, "float32", name=n) for n in values])


def _flat_names(spec):
    names = []
    for item in spec:
        names += _flat_names(item) if isinstance(item, (list, tuple)) else [item.name]
    return names


def _trace_programs(programs, directory, head_dim=None):
    """Trace and save each (name, layer, input spec, output names); returns (files, {name: entry})."""
    files, entries = [], {}
    for name, layer, spec, outputs in programs:
        layer.eval()
        trace_and_save(layer, spec, str(directory / name), head_dim)
        program_files = [f"{name}.json", f"{name}.pdiparams"]
        missing = [f for f in program_files if not (directory / f).is_file()]
        if missing:
            raise RuntimeError(f"paddle.jit.save did not write {missing} (wrote {sorted(os.listdir(directory))})")
        files += program_files
        # Paddle names a saved program's outputs fetch_name_0, 1, .. in return order.
        entries[name] = {"model": program_files[0], "params": program_files[1], "inputs": _flat_names(spec),
                         "outputs": list(outputs)}
    return files, entries


def _write_export(out_dir, kind, cfg, build, tokenizer=None, extra=None, check=None):
    """Write an exported family model to out_dir (built under a temporary name, renamed into place):
    `build(directory)` traces the programs and returns (files, program entries). `check(directory)` (optional)
    runs the saved programs against the eager model. Returns {file name: bytes}."""
    out_dir = Path(out_dir).expanduser().resolve()
    prepare_destination(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files, programs = build(tmp)
        if tokenizer is not None:
            files += write_tokenizer(tokenizer, str(tmp))
        metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
                    "paddle_version": paddle.__version__, "config": config_to_dict(cfg), "programs": programs,
                    **(extra or {})}
        write_metadata(tmp, metadata, files)
        if check is not None:
            with paddle.no_grad():
                check(str(tmp))
        written = {name: os.path.getsize(tmp / name) for name in sorted(os.listdir(tmp))}
        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


def exported_kind(model_dir):
    """The family kind recorded in model_dir/ppzoo.json, or None when it is not a family export (a ChuXin
    or HelixFold export, or no export at all: their own loaders report what is wrong)."""
    if exported_format(model_dir) != FORMAT:
        return None
    return read_family_metadata(model_dir).get("kind")


def read_family_metadata(model_dir):
    return read_metadata(model_dir, FORMAT, FORMAT_VERSION, required=("kind", "config", "programs", "files"))


def _dense(value):
    """A Tensor whose memory is laid out densely: the predictor reads a fed tensor's memory as if it were,
    so a strided view (e.g. hidden[:, -1]) would be read wrong (seen: the second row's logits garbage)."""
    if not isinstance(value, paddle.Tensor):
        return paddle.to_tensor(np.ascontiguousarray(value))
    return value if value.is_contiguous() else value.contiguous()


class ProgramRunner:
    """One saved program of a family export: run({input name: tensor or array}) -> {output name: tensor},
    the outputs copied out of the predictor's buffers."""

    def __init__(self, model_dir, entry, threads=None, onednn=False):
        from ppzoo.inference.predictor import create_paddle_predictor

        self.inputs, self.outputs = entry["inputs"], entry["outputs"]
        program = os.path.join(model_dir, entry["model"])
        self._predictor = create_paddle_predictor(program, os.path.join(model_dir, entry["params"]), threads, onednn)
        order = list(self._predictor.get_input_names())
        if sorted(order) != sorted(self.inputs):
            raise CheckpointError(f"{program} takes inputs {order}, not the recorded {self.inputs}")
        self._input_order = order
        fetch = list(self._predictor.get_output_names())
        expected = [f"fetch_name_{i}" for i in range(len(self.outputs))]
        if sorted(fetch) != sorted(expected):
            raise CheckpointError(f"{program} has outputs {fetch}, not the {len(self.outputs)} recorded")
        self._output_index = [fetch.index(name) for name in expected]

    def run(self, feeds):
        from paddle.base import core

        from ppzoo.inference.predictor import _as_tensor, default_threads

        tensors = [_dense(v) for v in (feeds[name] for name in self._input_order)]
        outputs = self._predictor.run(tensors)
        core.set_num_threads(default_threads())  # as Predictor.run: Paddle Inference leaves one thread
        return {name: outputs[i].clone() for name, i in zip(self.outputs, self._output_index)}


def load_family_export(model_dir, threads=None, onednn=False, verify=True):
    """(exported model, tokenizer or None, metadata) of a family export, by its recorded kind."""
    model_dir = str(model_dir)
    metadata = read_family_metadata(model_dir)
    verify_files(model_dir, metadata, checksums=verify)
    kind = metadata["kind"]
    if kind not in LOADERS:
        raise CheckpointError(f"{os.path.join(model_dir, METADATA_FILE)} records kind {kind!r}; this ppzoo loads "
                              f"{sorted(LOADERS)}")
    cfg = config_from_dict(metadata["config"], source=os.path.join(model_dir, METADATA_FILE))
    runners = {name: ProgramRunner(model_dir, entry, threads, onednn) for name, entry in metadata["programs"].items()}
    tokenizer = None
    if TOKENIZER_FILE in metadata["files"]:
        tokenizer = Tokenizer.from_file(os.path.join(model_dir, TOKENIZER_FILE))
    return LOADERS[kind](runners, cfg, metadata), tokenizer, metadata


def _cache_feeds(cache, batch, cache_meta, prefix="past"):
    keys, values = cache.past(batch, cache_meta)
    key_names, value_names = cache_names(prefix, cache_meta["num_layers"])
    return {**dict(zip(key_names, keys)), **dict(zip(value_names, values))}


def _store_presents(cache, outputs, num_layers):
    keys, values = cache_names("present", num_layers)
    cache.store([outputs[n] for n in keys], [outputs[n] for n in values])


# ----------------------------------------------------------------------------------------- RecycleGPT
class _RecycleBase(nn.Layer):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, position_ids, attn_mask, past_keys, past_values):
        cache = PassedKVCache(past_keys, past_values)
        hidden = self.lm.model(input_ids, position_ids, None, attn_mask, cache)
        keys, values = cache.presents()
        return (hidden, *keys, *values)


class _RecycleHead(nn.Layer):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, hidden):
        if self.lm.lm_head is None:  # tied embeddings, as BaseLM.head
            return paddle.matmul(hidden, self.lm.model.embed_tokens.weight, transpose_y=True)
        return self.lm.lm_head(hidden)


class _Recycler(nn.Layer):
    def __init__(self, lm, recycler):
        super().__init__()
        self.head, self.recycler = _RecycleHead(lm), recycler

    def forward(self, recycled, input_ids, position_ids, attn_mask, past_keys, past_values):
        cache = PassedKVCache(past_keys, past_values)
        embeds = self.head.lm.model.embed_tokens(input_ids)
        hidden = self.recycler(recycled, embeds, position_ids, None, attn_mask, cache)
        keys, values = cache.presents()
        return (self.head(hidden[:, -1]), *keys, *values)


def _cache_outputs(num_layers):
    keys, values = cache_names("present", num_layers)
    return [*keys, *values]


def export_recycle_gpt(module, cfg, tokenizer, out_dir, check=True):
    """Export a RecycleGPT Module: the base, the LM head and the recyclable module as three programs."""
    if tokenizer is None:
        raise PpzooError("export needs the model's tokenizer (the checkpoint has no tokenizer.json)")
    c = module.model.config
    lm, recycler = module.model, module.recycler
    ids = [InputSpec([None, None], "int64", name="input_ids"), InputSpec([None, None], "int64", name="position_ids"),
           InputSpec([None, 1, None, None], "float32", name="attn_mask")]
    hidden = InputSpec([None, None, c.hidden_size], "float32", name="recycled")

    def build(directory):
        return _trace_programs([
            ("base", _RecycleBase(lm), [*ids, *_cache_spec("past", c.num_layers, c.num_kv_heads, c.head_dim)],
             ["hidden", *_cache_outputs(c.num_layers)]),
            ("head", _RecycleHead(lm), [InputSpec([None, c.hidden_size], "float32", name="hidden")], ["logits"]),
            ("recycler", _Recycler(lm, recycler),
             [hidden, *ids, *_cache_spec("past", c.recycle_layers, c.num_kv_heads, c.head_dim)],
             ["logits", *_cache_outputs(c.recycle_layers)]),
        ], directory, c.head_dim)

    extra = {"cache": {"base": {"num_layers": c.num_layers, "num_kv_heads": c.num_kv_heads, "head_dim": c.head_dim},
                       "recycler": {"num_layers": c.recycle_layers, "num_kv_heads": c.num_kv_heads,
                                    "head_dim": c.head_dim}}}

    def self_check(directory):
        exported, _, _ = load_family_export(directory, threads=1)
        _check_recycle(module.recyclable_model(), exported)

    return _write_export(out_dir, "recycle_gpt", cfg, build, tokenizer, extra, self_check if check else None)


def _check_recycle(eager, exported, atol=1e-3):
    """A 5-token prefill of the base, its head, and the recycler over the same positions: exported == eager."""
    from ppzoo.inference.cache import DenseKVCache
    from ppzoo.inference.predictor import ExportedKVCache, causal_mask

    ids = np.random.default_rng(0).integers(0, eager.config.vocab_size, size=(1, 5))
    pos, mask = np.arange(5)[None], causal_mask(1, 5, 0)
    t = paddle.to_tensor
    want_h = eager.base_step(t(ids), t(pos), t(mask), DenseKVCache())
    got_h = exported.base_step(ids, pos, mask, ExportedKVCache())
    want_l, got_l = eager.logits(want_h[:, -1]), exported.logits(got_h[:, -1])
    recycled = paddle.concat([paddle.zeros_like(want_h[:, :1]), want_h[:, :-1]], axis=1)
    want_r = eager.recycle_step(recycled, t(ids), t(pos), t(mask), DenseKVCache())
    got_r = exported.recycle_step(recycled, ids, pos, mask, ExportedKVCache())
    for what, got, want in (("hidden states", got_h, want_h), ("logits", got_l, want_l),
                            ("recyclable module's logits", got_r, want_r)):
        error = float(np.abs(got.numpy() - want.numpy()).max())
        if got.shape != want.shape or error > atol * max(1.0, float(np.abs(want.numpy()).max())):
            raise PpzooError(f"the exported RecycleGPT's {what} differ from the eager model's (max error {error:.2e})")


class _ExportedBaseLM:
    """RecycleGPT's base LM from the exported programs with the generation interface the plain Generator
    drives (the "base" strategy): model(input_ids, position_ids=, attn_mask=, cache=) -> last logits
    [b, 1, vocab]; defaults as ExportedLanguageModel's."""

    training = False

    def __init__(self, recycle_gpt, config):
        self.recycle_gpt, self.config = recycle_gpt, config

    def __call__(self, input_ids, position_ids=None, attn_mask=None, cache=None):
        from ppzoo.inference.predictor import ExportedKVCache, causal_mask

        cache = cache if cache is not None else ExportedKVCache()
        input_ids = _int64(input_ids)
        b, s = input_ids.shape
        past = cache.keys[0].shape[2] if getattr(cache, "keys", None) is not None else 0
        if position_ids is None:
            position_ids = paddle.arange(past, past + s, dtype="int64").unsqueeze(0).expand([b, s])
        if attn_mask is None:
            attn_mask = causal_mask(b, s, past)
        hidden = self.recycle_gpt.base_step(input_ids, position_ids, attn_mask, cache)
        return self.recycle_gpt.logits(hidden[:, -1]).unsqueeze(1)

    def eval(self):
        return self

    def train(self, mode=True):
        return self


class ExportedRecycleGPT:
    """An exported RecycleGPT behind the interface of ppzoo.models.recycle_gpt.model.RecycleGPT, so that
    RecycleGenerator(model, tokenizer, strategy, cache_factory=ExportedKVCache) decodes with the programs."""

    training = False

    def __init__(self, runners, cfg, metadata):
        self.runners, self.metadata = runners, metadata
        self.config = cfg.Model
        self.lm = _ExportedBaseLM(self, cfg.Model)
        self._cache_meta = metadata["cache"]

    def _step(self, name, cache, feeds, batch):
        from ppzoo.inference.predictor import ExportedKVCache

        if not isinstance(cache, ExportedKVCache):
            raise TypeError(f"an exported RecycleGPT carries its caches in ExportedKVCache objects, got "
                            f"{type(cache).__name__}; create the generator with cache_factory=ExportedKVCache")
        meta = self._cache_meta[name]
        outputs = self.runners[name].run({**feeds, **_cache_feeds(cache, batch, meta)})
        _store_presents(cache, outputs, meta["num_layers"])
        return outputs

    def base_step(self, input_ids, position_ids, attn_mask, cache):
        feeds = {"input_ids": _int64(input_ids), "position_ids": _int64(position_ids),
                 "attn_mask": _float32(attn_mask)}
        return self._step("base", cache, feeds, feeds["input_ids"].shape[0])["hidden"]

    def logits(self, hidden):
        return self.runners["head"].run({"hidden": _float32(hidden)})["logits"]

    def recycle_step(self, recycled, input_ids, position_ids, attn_mask, cache):
        feeds = {"recycled": _float32(recycled), "input_ids": _int64(input_ids),
                 "position_ids": _int64(position_ids), "attn_mask": _float32(attn_mask)}
        return self._step("recycler", cache, feeds, feeds["input_ids"].shape[0])["logits"]

    def eval(self):
        return self

    def train(self, mode=True):
        return self


def _int64(value):
    from ppzoo.inference.predictor import _as_tensor
    return _as_tensor(value, "int64")


def _float32(value):
    from ppzoo.inference.predictor import _as_tensor
    return _as_tensor(value, "float32")


# ----------------------------------------------------------------------------------------- MoE-GPT
# MoEGPTForCausalLM has no KV cache: its program is the full-sequence forward, input_ids [b, s] -> logits
# [b, s, vocab] (ExportedMoEGPT), and generation with it reruns the sequence (no incremental decoding).
class _TracedCapacity:
    """The gate's capacity(tokens) while tracing: the value computed from the traced token count."""

    def __init__(self, value):
        self.value = value

    def __call__(self, tokens):
        return self.value


class _TracedMoE(nn.Layer):
    """A MoELayer's forward for tracing, the same math as the eager one on a single process.

    The eager dispatch plans the exchange on the host (counts copied out, Python ints slicing the received
    rows), which a traced program cannot do. Here each expert gathers its (token, choice) slots with a
    data-dependent nonzero, runs on those rows and scatters its outputs back to the same slots; dropped
    choices (expert -1) stay zero, and the slots are combined with the gate's weights as in eager. The
    gate's capacity, a Python int from the token count, becomes the same formula on the traced count.
    Stands in for the MoELayer as the decoder layer's mlp while tracing: not being a MoELayer, its output is
    used as a dense MLP's (no MoEStats)."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe
        self.expert_ids = list(moe.local_expert_indices())

    def forward(self, x):
        moe, gate = self.moe, self.moe.gate
        hidden = x.shape[-1]
        tokens = x.reshape([-1, hidden])
        if hasattr(gate, "eval_capacity_factor"):  # GShardGate/SwitchGate.capacity: max(1, ceil(f * T * k / E))
            count = paddle.shape(tokens)[0].astype("float32")
            capacity = paddle.maximum(paddle.ceil(gate.eval_capacity_factor * count * gate.top_k / gate.num_experts),
                                      paddle.ones([], "float32")).astype("int64")
            # An instance attribute over the gate's method, removed by export_moe_gpt after tracing.
            gate.capacity = _TracedCapacity(capacity)
        routing = gate(tokens, moe.expert_loss_weights)
        k = routing.experts.shape[1]
        flat = routing.experts.reshape([-1])
        slots = paddle.zeros([paddle.shape(flat)[0], hidden], dtype=x.dtype)
        for g in self.expert_ids:
            where = paddle.nonzero(flat == g)  # [n, 1]: this expert's slots, in token order
            expert = moe.expert(g)
            out = expert(paddle.gather(tokens, where.squeeze(-1) // k))
            slots = slots + paddle.scatter_nd(where, out, paddle.shape(slots))
        y = (slots.reshape([-1, k, hidden]) * routing.weights.unsqueeze(-1)).sum(axis=1)
        return y.reshape(paddle.shape(x))


class _MoEForward(nn.Layer):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        # One document per row: the packed-document mask is then the causal mask. (Without doc_ids the model's
        # attention builds its causal mask with paddle.tril over the sequence length, a Python int in eager
        # and a traced value here, which tril does not take.)
        return self.lm(input_ids, doc_ids=paddle.zeros_like(input_ids))[0]


def export_moe_gpt(module, cfg, tokenizer, out_dir, check=True):
    """Export a MoE-GPT Module's full-sequence forward (input_ids -> logits at every position)."""
    lm = module.model
    for moe in lm.moe_layers():
        if moe.ep.size != 1:
            raise PpzooError("export needs the full single-process model (all experts on one rank); load the "
                             "checkpoint with load_checkpoint_for_inference")

    def build(directory):
        moe_layers = [layer for layer in lm.layers if layer.mlp in lm.moe_layers()]
        originals = [layer.mlp for layer in moe_layers]
        for layer, moe in zip(moe_layers, originals):
            layer.mlp = _TracedMoE(moe)
        try:
            return _trace_programs([("model", _MoEForward(lm), [InputSpec([None, None], "int64", name="input_ids")],
                                     ["logits"])], directory, lm.config.head_dim)
        finally:
            for layer, moe in zip(moe_layers, originals):
                layer.mlp = moe
                moe.gate.__dict__.pop("capacity", None)

    def self_check(directory):
        exported, _, _ = load_family_export(directory, threads=1)
        ids = np.random.default_rng(0).integers(0, lm.config.vocab_size, size=(2, 7))
        want = lm(paddle.to_tensor(ids))[0].numpy()
        got = exported(ids).numpy()
        _require_close("MoE-GPT logits", got, want)

    return _write_export(out_dir, "moe_gpt", cfg, build, tokenizer, None, self_check if check else None)


class ExportedMoEGPT:
    """An exported MoE-GPT: model(input_ids [b, s]) -> logits [b, s, vocab] (the eager model's first output)."""

    training = False

    def __init__(self, runners, cfg, metadata):
        self.runner, self.config, self.metadata = runners["model"], cfg.Model, metadata

    def __call__(self, input_ids):
        return self.runner.run({"input_ids": _int64(input_ids)})["logits"]


def _require_close(what, got, want, atol=1e-3):
    error = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
    if error > atol * max(1.0, float(np.abs(want).max())):
        raise PpzooError(f"the exported {what} {got.shape} differ from the eager model's {want.shape} "
                         f"(max error {error:.2e}); this Paddle build ({paddle.__version__}) does not export it "
                         "correctly")


# ----------------------------------------------------------------------------------------- ERNIE Titan
# The generation path (universal + generation layers, relative positions) with its cache as past/present:
#     input_ids, position_ids [b, s]; key_positions [b, past + s] (positions of every key, the relative
#     attention needs them); attn_mask [b, 1, s, past + s]; past_key_i / past_value_i per causal layer
#     -> logits of the last position [b, 1, vocab], present_key_i / present_value_i.
# Recurrence memory (read_context, soft genre prompts) stays eager: it primes the cache through the model.
class _TitanStep(nn.Layer):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, position_ids, key_positions, attn_mask, past_keys, past_values):
        cache = PassedKVCache(past_keys, past_values)
        model = self.lm.model
        hidden, _ = model.generate_hidden(model.embed(input_ids), position_ids, cache=cache,
                                          key_positions=key_positions, mask=attn_mask)
        keys, values = cache.presents()
        return (model.lm_head(hidden[:, -1:]).astype("float32"), *keys, *values)


def export_titan(module, cfg, tokenizer, out_dir, check=True):
    """Export an ErnieTitan Module's generator (TitanCausalLM) with its KV cache as past/present tensors."""
    if tokenizer is None:
        raise PpzooError("export needs the model's tokenizer (the checkpoint has no tokenizer.json)")
    lm = module.language_model()
    attn = lm.causal_layers()[0].attn
    layers = len(lm.causal_layers())
    meta = {"num_layers": layers, "num_kv_heads": attn.heads, "head_dim": attn.head_dim}
    ints = [InputSpec([None, None], "int64", name=n) for n in ("input_ids", "position_ids", "key_positions")]
    spec = [*ints, InputSpec([None, 1, None, None], "float32", name="attn_mask"),
            *_cache_spec("past", layers, attn.heads, attn.head_dim)]

    def build(directory):
        return _trace_programs([("model", _TitanStep(lm), spec, ["logits", *_cache_outputs(layers)])], directory)

    def self_check(directory):
        from ppzoo.inference.cache import DenseKVCache
        from ppzoo.inference.predictor import ExportedKVCache

        exported, _, _ = load_family_export(directory, threads=1)
        ids = np.random.default_rng(0).integers(0, lm.config.vocab_size, size=(1, 6))
        eager_cache, exported_cache = DenseKVCache(), ExportedKVCache()
        for start, stop in ((0, 5), (5, 6)):
            want = lm(paddle.to_tensor(ids[:, start:stop]), cache=eager_cache)[:, -1:].numpy()
            eager_cache.advance(stop - start)
            got = exported(ids[:, start:stop], cache=exported_cache).numpy()
            exported_cache.advance(stop - start)
            _require_close("ERNIE Titan generator's logits", got, want)

    return _write_export(out_dir, "ernie_titan", cfg, build, tokenizer, {"cache": meta},
                         self_check if check else None)


class ExportedTitanLM:
    """An exported Titan generator with TitanCausalLM's generation interface (no recurrence memory):
    model(input_ids, position_ids=None, attn_mask=None, cache=ExportedKVCache) -> last logits [b, 1, vocab].
    Defaults as TitanCausalLM: positions continue after the cache's last key, the mask is causal."""

    training = False

    def __init__(self, runners, cfg, metadata):
        self.runner, self.metadata, self.config = runners["model"], metadata, cfg.Model
        self.vocab_limit = None  # as TitanCausalLM.vocab_limit
        self.memory = None

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def __call__(self, input_ids, position_ids=None, attn_mask=None, cache=None):
        from ppzoo.inference.predictor import ExportedKVCache
        from ppzoo.models.ernie_titan.model import additive_mask, segment_mask

        cache = cache if cache is not None else ExportedKVCache()
        if not isinstance(cache, ExportedKVCache):
            raise TypeError(f"an exported Titan generator carries its cache in an ExportedKVCache, got "
                            f"{type(cache).__name__}; create the Generator with cache_factory=ExportedKVCache")
        input_ids = _int64(input_ids)
        b, s = input_ids.shape
        known = getattr(cache, "key_positions", None)
        if known is None:
            known = paddle.zeros([b, 0], dtype="int64")
        if position_ids is None:
            start = known[:, -1:] + 1 if known.shape[1] else paddle.zeros([b, 1], dtype="int64")
            position_ids = start + paddle.arange(s, dtype="int64").unsqueeze(0)
        position_ids = _int64(position_ids)
        key_positions = paddle.concat([known, position_ids], axis=1)
        if attn_mask is None:
            attn_mask = additive_mask(segment_mask(paddle.ones(key_positions.shape, dtype="bool"), s, causal=True))
        feeds = {"input_ids": input_ids, "position_ids": position_ids, "key_positions": key_positions,
                 "attn_mask": _float32(attn_mask), **_cache_feeds(cache, b, self.metadata["cache"])}
        outputs = self.runner.run(feeds)
        _store_presents(cache, outputs, self.metadata["cache"]["num_layers"])
        # Kept with the cache it describes (as TitanCausalLM keeps them per cache): the next call's keys follow.
        cache.key_positions = key_positions
        logits = outputs["logits"]
        return logits[..., :self.vocab_limit] if self.vocab_limit is not None else logits


# ----------------------------------------------------------------------------------------- ERNIE-ViLG
# The shared transformer's incremental decoding in both directions, and the VQ-VAE's two halves:
#     t2i_start  text_ids [b, T]                         -> image-code logits [b, K], present cache
#     t2i_step   code [b, 1], position [1], attn_mask [b, 1, 1, past + 1], past cache
#                                                         -> image-code logits [b, K], present cache
#     i2t_start  codes [b, N]                            -> word logits [b, V], present cache
#     i2t_step   word [b, 1], position [1], attn_mask, past cache -> word logits [b, V], present cache
#     vq_decoder codes [b, N] -> images [b, 3, H, W]      vq_encoder images [b, 3, H, W] -> codes [b, N]
# The cache is the model's own (per block, positions-first [b, positions, heads, head_dim]). The decoder is
# the two-stage path (codes -> codebook vectors -> images); end-to-end mode's hidden-state decoder is not
# exported.
class _ViLGStart(nn.Layer):
    def __init__(self, module, text_to_image):
        super().__init__()
        self.gen, self.text_to_image, self.pad = module.generator, text_to_image, module.text_tokenizer.PAD

    def forward(self, condition_ids):
        gen = self.gen
        b = paddle.shape(condition_ids)[0]
        if self.text_to_image:  # as generation.sample_codes
            ones = paddle.ones([b, 1], "bool")
            valid = paddle.concat([ones, condition_ids != self.pad, ones], axis=1)
            hidden, cache = gen.start_decoding(gen.text_segment(condition_ids), gen.image_start(b), valid)
            logits = gen.image_head(hidden)
        else:  # as generation._image_condition
            valid = paddle.ones([b, gen.num_image_tokens + 2], "bool")
            hidden, cache = gen.start_decoding(gen.image_segment(condition_ids), gen.text_start(b), valid)
            logits = gen.text_head(hidden)
        return (logits, *[k for k, _ in cache], *[v for _, v in cache])


class _ViLGStep(nn.Layer):
    def __init__(self, module, text_to_image):
        super().__init__()
        self.gen, self.text_to_image = module.generator, text_to_image

    def forward(self, token, position, attn_mask, past_keys, past_values):
        gen = self.gen
        embed = gen.image_tokens if self.text_to_image else gen.text_tokens
        hidden, cache = gen.run(embed(token, position), attn_mask, list(zip(past_keys, past_values)))
        head = gen.image_head if self.text_to_image else gen.text_head
        return (head(hidden[:, -1]), *[k for k, _ in cache], *[v for _, v in cache])


class _VQDecoder(nn.Layer):
    def __init__(self, module):
        super().__init__()
        self.vqvae, self.grid = module.vqvae, module.config.vqvae.grid_size

    def forward(self, codes):
        return self.vqvae.decode_codes(codes.reshape([-1, self.grid, self.grid]))


class _VQEncoder(nn.Layer):
    def __init__(self, module):
        super().__init__()
        self.vqvae = module.vqvae

    def forward(self, images):
        return self.vqvae.encode(images).reshape([paddle.shape(images)[0], -1])


def export_vilg(module, cfg, tokenizer, out_dir, check=True):
    """Export an ErnieViLG Module: decoding in both directions and the VQ-VAE (see the table above)."""
    c, gen = module.config, module.generator
    layers, heads, head_dim = c.num_layers, c.num_heads, c.hidden_size // c.num_heads
    vq = c.vqvae
    size = vq.image_size
    cache_shape = [None, None, heads, head_dim]  # positions-first, as Block keeps it
    keys, values = cache_names("past", layers)
    past = [[InputSpec(cache_shape, "float32", name=n) for n in keys],
            [InputSpec(cache_shape, "float32", name=n) for n in values]]
    step_inputs = [InputSpec([None, 1], "int64", name="token"), InputSpec([1], "int64", name="position"),
                   InputSpec([None, 1, 1, None], "float32", name="attn_mask"), *past]
    presents = _cache_outputs(layers)

    def build(directory):
        return _trace_programs([
            ("t2i_start", _ViLGStart(module, True), [InputSpec([None, c.max_text_len], "int64", name="text_ids")],
             ["logits", *presents]),
            ("t2i_step", _ViLGStep(module, True), step_inputs, ["logits", *presents]),
            ("i2t_start", _ViLGStart(module, False), [InputSpec([None, gen.num_image_tokens], "int64", name="codes")],
             ["logits", *presents]),
            ("i2t_step", _ViLGStep(module, False), step_inputs, ["logits", *presents]),
            ("vq_decoder", _VQDecoder(module), [InputSpec([None, gen.num_image_tokens], "int64", name="codes")],
             ["images"]),
            ("vq_encoder", _VQEncoder(module), [InputSpec([None, 3, size, size], "float32", name="images")],
             ["codes"]),
        ], directory)

    def self_check(directory):
        from ppzoo.models.ernie_vilg.generation import caption_greedy

        exported, _, _ = load_family_export(directory, threads=1)
        codes = paddle.to_tensor(np.random.default_rng(0).integers(0, vq.codebook_size, (2, gen.num_image_tokens)))
        _require_close("ViLG images", exported.decode_codes(codes).numpy(), module.decode_codes(codes).numpy())
        if not np.array_equal(exported.caption_greedy(codes).numpy(), caption_greedy(module, codes).numpy()):
            raise PpzooError("the exported ViLG's greedy captions differ from the eager model's")

    extra = {"image_size": size, "num_image_tokens": gen.num_image_tokens, "max_text_len": c.max_text_len,
             "cache": {"num_layers": layers, "num_heads": heads, "head_dim": head_dim,
                       "layout": "per layer: [b, positions, heads, head_dim]"}}
    return _write_export(out_dir, "ernie_vilg", cfg, build, None, extra, self_check if check else None)


class ExportedViLG:
    """An exported ERNIE-ViLG: decode_codes(codes) -> images, image_codes(images) -> codes, and the decoding
    loops of ppzoo.models.ernie_vilg.generation run on the programs (sample_codes, caption_greedy)."""

    training = False

    def __init__(self, runners, cfg, metadata):
        from ppzoo.data.images import CaptionTokenizer

        self.runners, self.metadata, self.config = runners, metadata, cfg.Model
        self.text_tokenizer = CaptionTokenizer()
        self.layers = metadata["cache"]["num_layers"]
        self.num_image_tokens = metadata["num_image_tokens"]

    def decode_codes(self, codes):
        return self.runners["vq_decoder"].run({"codes": _int64(codes)})["images"]

    def image_codes(self, images):
        return self.runners["vq_encoder"].run({"images": _float32(images)})["codes"]

    def _start(self, name, feeds):
        out = self.runners[name].run(feeds)
        keys, values = cache_names("present", self.layers)
        return out["logits"], [out[k] for k in keys], [out[v] for v in values]

    def _step(self, name, token, position, key_valid, keys, values):
        from ppzoo.models.ernie_vilg.model import additive_mask

        past_keys, past_values = cache_names("past", self.layers)
        feeds = {"token": _int64(token), "position": paddle.to_tensor([position], dtype="int64"),
                 "attn_mask": additive_mask(key_valid.unsqueeze(1)),
                 **dict(zip(past_keys, keys)), **dict(zip(past_values, values))}
        return self._start(name, feeds)

    @paddle.no_grad()
    def sample_codes(self, text_ids, sampling):
        """As generation.sample_codes: image codes [b, N] for captions [b, T] (top-k sampling)."""
        from ppzoo.models.ernie_vilg.generation import _top_k_sample

        text_ids = _int64(text_ids)
        b, pad = text_ids.shape[0], self.text_tokenizer.PAD
        valid = paddle.concat([paddle.ones([b, 1], "bool"), text_ids != pad, paddle.ones([b, 1], "bool")], axis=1)
        logits, keys, values = self._start("t2i_start", {"text_ids": text_ids})
        codes = []
        for position in range(1, self.num_image_tokens + 1):
            code = _top_k_sample(logits, sampling.top_k, sampling.temperature)
            codes.append(code)
            if position == self.num_image_tokens:
                break
            valid = paddle.concat([valid, paddle.ones([b, 1], "bool")], axis=1)
            logits, keys, values = self._step("t2i_step", code.unsqueeze(1), position, valid, keys, values)
        return paddle.stack(codes, axis=1)

    @paddle.no_grad()
    def caption_greedy(self, codes):
        """As generation.caption_greedy: word ids [b, T] of the captions of codes [b, N]."""
        from ppzoo.models.ernie_vilg.generation import _pad_to

        tok, t = self.text_tokenizer, self.config.max_text_len
        codes = _int64(codes)
        b = codes.shape[0]
        valid = paddle.ones([b, self.num_image_tokens + 2], "bool")
        logits, keys, values = self._start("i2t_start", {"codes": codes})
        out, finished = [], paddle.zeros([b], "bool")
        for position in range(1, t + 1):
            word = logits[..., :tok.vocab_size].argmax(-1)
            word = paddle.where(finished, paddle.full_like(word, tok.PAD), word)
            out.append(word)
            finished = finished | (word == tok.EOS) | (word == tok.PAD)
            if position == t or bool(finished.all()):
                break
            valid = paddle.concat([valid, paddle.ones([b, 1], "bool")], axis=1)
            logits, keys, values = self._step("i2t_step", word.unsqueeze(1), position, valid, keys, values)
        return _pad_to(paddle.stack(out, axis=1), t, tok.PAD)

    def captions(self, images):
        """Greedy captions (strings) of images [b, 3, H, W] in [-1, 1]."""
        ids = self.caption_greedy(self.image_codes(images))
        return [self.text_tokenizer.decode(row) for row in ids.numpy()]


# ----------------------------------------------------------------------------------------- dispatch
# Module name (the checkpoint's Model.module) -> exporter(module, cfg, tokenizer, out_dir, check).
EXPORTERS = {"RecycleGPT": export_recycle_gpt, "MoEGPT": export_moe_gpt, "ErnieTitan": export_titan, "ErnieViLG": export_vilg}
# Recorded kind -> loader(runners, cfg, metadata).
LOADERS = {"recycle_gpt": ExportedRecycleGPT, "moe_gpt": ExportedMoEGPT, "ernie_titan": ExportedTitanLM, "ernie_vilg": ExportedViLG}


def export_family(module, cfg, tokenizer, out_dir, check=True):
    """Export a module of a family listed in EXPORTERS (by cfg.model_module)."""
    if cfg.model_module not in EXPORTERS:
        raise PpzooError(f"no exporter for Model.module {cfg.model_module!r}; exportable: {sorted(EXPORTERS)}, "
                         "ChuXin and HelixFold")
    return EXPORTERS[cfg.model_module](module, cfg, tokenizer, out_dir, check=check)
