"""Run a model exported by ppzoo.inference.export with Paddle Inference, behind the Generator's model API.

    model, tokenizer, metadata = load_exported("exported/chuxin_tiny")
    Generator(model, tokenizer, cache_factory=ExportedKVCache).generate("def fibonacci(n):")

`Predictor` is the paddle.inference predictor of one exported directory (inputs and outputs by the names
of the export signature). `ExportedLanguageModel` gives it the call shape of ChuXinForCausalLM
(`model(input_ids, position_ids=, attn_mask=, cache=) -> logits`), and `ExportedKVCache` carries the
per-layer present keys/values from one call to the next. Tensors stay paddle Tensors end to end: the
predictor's tensor-list `run` reads and returns them without copies through numpy.
"""
import os
import weakref

import numpy as np
import paddle
from paddle import inference
from paddle.base import core

from ppzoo.config import config_from_dict
from ppzoo.data.tokenizer import Tokenizer
from ppzoo.errors import CheckpointError, PpzooError
from ppzoo.inference.cache import KVCache
from ppzoo.inference.export import (
    METADATA_FILE,
    TOKENIZER_FILE,
    cache_names,
    input_names,
    output_names,
    read_metadata,
    verify_files,
)

NEG_INF = float("-inf")


def causal_mask(batch, num_new, past):
    """Additive mask [batch, 1, num_new, past + num_new] for new positions following `past` cached ones
    with no padding: each new position sees every cached position and the new ones up to itself."""
    keys = np.arange(past + num_new)[None, :]
    queries = np.arange(past, past + num_new)[:, None]
    mask = np.where(keys <= queries, 0.0, NEG_INF).astype(np.float32)
    return np.broadcast_to(mask, (batch, 1, num_new, past + num_new)).copy()


def default_threads():
    """OMP_NUM_THREADS (ppzoo sets it at import from the cores available), else the core count."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _as_tensor(value, dtype):
    """A paddle Tensor of `dtype` (numpy arrays and lists converted; a Tensor of that dtype is used as is)."""
    if isinstance(value, paddle.Tensor):
        return value if value.dtype == getattr(paddle, dtype) else value.astype(dtype)
    return paddle.to_tensor(np.ascontiguousarray(value, dtype=dtype))


def _gpu_available():
    return paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def create_paddle_predictor(program, params, threads=None, onednn=False):
    """A paddle.inference predictor of one saved program (model.json + model.pdiparams): on the GPU when
    there is one, else on `threads` CPU threads with oneDNN only if asked (see Predictor)."""
    config = inference.Config(program, params)
    if _gpu_available():
        config.enable_use_gpu(256, 0)  # initial memory pool (MB), device 0
    else:
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(threads or default_threads())
        if onednn:
            config.enable_onednn()
        else:
            config.disable_onednn()
    # (config.enable_memory_optim() is not called: it fails on CPU builds of Paddle 3.3.)
    config.disable_glog_info()
    try:
        return inference.create_predictor(config)
    except Exception as err:  # Paddle raises bare RuntimeErrors for unreadable programs
        raise CheckpointError(
            f"Paddle cannot load the exported program {program} ({err}); export the model again"
        ) from None


class Predictor:
    """A paddle.inference predictor for one exported model directory.

    `threads`: CPU math library threads (default: OMP_NUM_THREADS). `onednn`: use Paddle's oneDNN kernels
    on CPU (Paddle 3.3 turns them on by default; we turn them off unless asked). Off because it is slower:
    tiny ChuXin's decode step took 9.5 vs 6.0 ms at batch 1 and 15.7 vs 12.7 ms at batch 8 with oneDNN
    (benchmarks/bench_decode.py --onednn, 1 thread), with the same greedy tokens. `verify`: check every
    file's size and SHA-256 against ppzoo.json before Paddle reads it (a damaged file can crash Paddle's
    C++ loader instead of raising an error).
    """

    def __init__(self, model_dir, threads=None, onednn=False, verify=True):
        self.model_dir = str(model_dir)
        self.metadata = read_metadata(self.model_dir)
        verify_files(self.model_dir, self.metadata, checksums=verify)
        program = os.path.join(self.model_dir, self.metadata["program"]["model"])
        params = os.path.join(self.model_dir, self.metadata["program"]["params"])
        self.on_gpu = _gpu_available()
        self._predictor = create_paddle_predictor(program, params, threads, onednn)
        self.num_layers = self.metadata["cache"].get("num_layers")
        expected_inputs = input_names(self.num_layers) if isinstance(self.num_layers, int) else None
        self._input_order = list(self._predictor.get_input_names())
        if expected_inputs is None or sorted(self._input_order) != sorted(expected_inputs):
            raise CheckpointError(
                f"{program} takes inputs {self._input_order}, not the exported signature {expected_inputs}"
            )
        self.output_names = output_names(self.num_layers)
        fetch_names = list(self._predictor.get_output_names())
        by_name = {o["name"]: o.get("fetch_name") for o in self.metadata["outputs"]}
        missing = [name for name in self.output_names if by_name.get(name) not in fetch_names]
        if missing:
            raise CheckpointError(
                f"{os.path.join(self.model_dir, METADATA_FILE)} names outputs {by_name} but {program} has {fetch_names}"
            )
        # Position of each signature output in the predictor's output list.
        self._output_index = [(name, fetch_names.index(by_name[name])) for name in self.output_names]

    def run(self, feeds):
        """{input name: paddle Tensor} -> {output name: paddle Tensor} (logits, present_key_0, ..).

        The outputs share memory with this predictor's own buffers, which a later run may write into in
        place (it reuses a buffer that is large enough): clone what must outlive the next run, or run it
        on a clone() of the predictor (see ExportedLanguageModel)."""
        outputs = self._predictor.run([feeds[name] for name in self._input_order])
        # Paddle Inference leaves the math library at one thread after every run ("to avoid thread
        # conflict"), which throttles any eager Paddle code in this process afterwards (measured, 2 threads:
        # a [1024, 256] x [256, 4096] matmul took 20.0 instead of 10.9 ms; in benchmarks/bench_decode.py the
        # eager engine's batch-8 prefill 0.11 instead of 0.07 s). Give eager code its threads back (0.2 us).
        core.set_num_threads(default_threads())
        return {name: outputs[i] for name, i in self._output_index}

    def clone(self):
        """A predictor of the same program and weights (shared, not copied) with buffers of its own."""
        twin = object.__new__(Predictor)
        twin.__dict__.update(self.__dict__)
        twin._predictor = self._predictor.clone()
        return twin

    def run_numpy(self, feeds):
        """As run(), with numpy arrays in and out."""
        outputs = self.run({name: _as_tensor(value, "int64" if name.endswith("_ids") else "float32")
                            for name, value in feeds.items()})
        return {name: value.numpy() for name, value in outputs.items()}


class ExportedKVCache(KVCache):
    """The KV cache of an exported model: the present keys/values the program returned at the previous
    call, one [b, kv_heads, positions, head_dim] tensor per layer each, fed back as the next call's past.

    `producer`: which of the model's predictors returned them (their memory is that predictor's output
    buffers; see ExportedLanguageModel), None once they are tensors of their own."""

    def __init__(self):
        super().__init__()
        self.keys = self.values = None
        self.producer = None

    def past(self, batch, cache_meta):
        """([keys per layer], [values per layer]) to feed: the stored ones, or empty ones (0 positions) before
        the first call."""
        if self.keys is None:
            empty = paddle.zeros([batch, cache_meta["num_kv_heads"], 0, cache_meta["head_dim"]], dtype="float32")
            layers = cache_meta["num_layers"]
            return [empty] * layers, [empty] * layers
        return self.keys, self.values

    def store(self, keys, values, producer=None):
        self.keys, self.values, self.producer = list(keys), list(values), producer

    def detach(self):
        """Copy the stored tensors out of the producing predictor's buffers (before that predictor runs for
        someone else)."""
        if self.keys is not None and self.producer is not None:
            self.store([k.clone() for k in self.keys], [v.clone() for v in self.values])

    def update(self, layer_idx, k, v):
        raise NotImplementedError("the exported program updates its cache itself; ExportedKVCache only carries it")

    def reorder(self, batch_indices):
        if self.keys is None:
            return
        index = paddle.to_tensor(batch_indices, dtype="int64")
        self.store([paddle.index_select(k, index, axis=0) for k in self.keys],
                   [paddle.index_select(v, index, axis=0) for v in self.values])


class ExportedLanguageModel:
    """An exported model with ChuXinForCausalLM's generation-time interface.

    `model(input_ids, position_ids=None, attn_mask=None, cache=None)` returns the logits of the last
    position only ([b, 1, vocab]; the exported program computes no others), which is what the Generator
    reads. `cache` must be an ExportedKVCache (pass cache_factory=ExportedKVCache to the Generator).
    Defaults as in the eager model: positions continue from the cache, the mask is causal over the cache.

    Two predictors (the second a clone: same weights, its own buffers) take turns for a cache. A
    predictor's outputs are its own buffers, reused in place by its next run when large enough (see
    Predictor.run); the program's present keys are the concat of the past ones and the new position, so a
    predictor fed its own previous presents, with buffers left large by an earlier longer generation,
    would write the concat over the very past it is reading (seen: wrong logits from the second generate()
    on). Fed the other predictor's presents, it only overwrites outputs the cache has already replaced.
    The alternative, copying the presents every call, costs a copy of the whole cache per step.
    """

    training = False  # an exported program has no training mode; eval()/train() are no-ops

    def __init__(self, predictor, config=None):
        self.predictor = predictor
        self.metadata = predictor.metadata
        if config is None:
            config = model_config_from_metadata(predictor.metadata, predictor.model_dir)
        self.config = config
        layers = predictor.num_layers
        self._past_key_names, self._past_value_names = cache_names("past", layers)
        self._present_key_names, self._present_value_names = cache_names("present", layers)
        self._runners = [predictor, predictor.clone()]
        self._holders = [None, None]  # per runner: weak reference to the cache holding its outputs

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def _runner_for(self, cache):
        """Index of the predictor to run for `cache`: not the one whose outputs the cache holds, and one whose
        outputs no other live cache holds if there is such; else that cache copies them out first (only when
        generations interleave)."""
        candidates = [i for i in range(len(self._runners)) if cache is None or cache.producer != i]
        holders = [self._holders[i]() if self._holders[i] is not None else None for i in candidates]
        for index, holder in zip(candidates, holders):
            if holder is None or holder is cache or holder.producer != index:
                return index
        holders[0].detach()
        return candidates[0]

    def __call__(self, input_ids, position_ids=None, attn_mask=None, cache=None, logits_to_keep=1):
        """`logits_to_keep`: as in ChuXinForCausalLM.forward, but the program computes the last position's
        logits only, so 1 is all it can give."""
        if logits_to_keep != 1:
            raise ValueError(f"an exported model returns the last position's logits only (logits_to_keep=1), "
                             f"not {logits_to_keep}")
        if cache is not None and not isinstance(cache, ExportedKVCache):
            raise TypeError(
                f"an exported model carries its KV cache in an ExportedKVCache, got {type(cache).__name__}; "
                "create the Generator with cache_factory=ExportedKVCache"
            )
        input_ids = _as_tensor(input_ids, "int64")
        b, s = input_ids.shape
        past_keys, past_values = (cache if cache is not None else ExportedKVCache()).past(b, self.metadata["cache"])
        past = past_keys[0].shape[2]
        if position_ids is None:
            position_ids = paddle.arange(past, past + s, dtype="int64").unsqueeze(0).expand([b, s])
        if attn_mask is None:
            attn_mask = causal_mask(b, s, past)
        feeds = {
            "input_ids": input_ids,
            "position_ids": _as_tensor(position_ids, "int64"),
            "attn_mask": _as_tensor(attn_mask, "float32"),
            **dict(zip(self._past_key_names, past_keys)),
            **dict(zip(self._past_value_names, past_values)),
        }
        index = self._runner_for(cache)
        outputs = self._runners[index].run(feeds)
        if cache is not None:
            cache.store([outputs[name] for name in self._present_key_names],
                        [outputs[name] for name in self._present_value_names], producer=index)
            self._holders[index] = weakref.ref(cache)
        else:
            self._holders[index] = None
        # A copy ([b, 1, vocab], a few us): the caller may keep logits across calls.
        return outputs["logits"].clone()


def model_config_from_metadata(metadata, model_dir):
    """The model's config dataclass (e.g. ChuXinConfig) from the training config stored in ppzoo.json."""
    source = os.path.join(model_dir, METADATA_FILE)
    try:
        return config_from_dict(metadata["config"], source=source).Model
    except PpzooError as err:
        raise CheckpointError(f"{source}: its stored config is invalid ({err})") from None


def load_exported(model_dir, threads=None, onednn=False, verify=True):
    """(ExportedLanguageModel, tokenizer, metadata) of an exported model directory. A directory of another
    family (ppzoo.inference.export_families; its kind is recorded in ppzoo.json) loads as that family's
    exported model (e.g. ExportedRecycleGPT) instead."""
    from ppzoo.inference import export_families

    if export_families.exported_kind(model_dir) is not None:
        return export_families.load_family_export(model_dir, threads=threads, onednn=onednn, verify=verify)
    predictor = Predictor(model_dir, threads=threads, onednn=onednn, verify=verify)
    tokenizer_file = os.path.join(str(model_dir), TOKENIZER_FILE)
    if not os.path.isfile(tokenizer_file):
        raise CheckpointError(f"{tokenizer_file} is missing; export the model again")
    try:
        tokenizer = Tokenizer.from_file(tokenizer_file)
    except PpzooError as err:
        raise CheckpointError(f"{tokenizer_file} cannot be loaded ({err})") from None
    return ExportedLanguageModel(predictor), tokenizer, predictor.metadata
