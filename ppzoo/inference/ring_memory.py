"""Ring-memory inference (SE-MoE): run a model whose weights exceed the fast-memory budget by cycling its
sections through K resident slots.

The model is cut into sections that a forward runs one after another, always in the same order: for MoE-GPT
the embedding, then per decoder layer its input norm, attention, post-attention norm and either its dense MLP
or its gate and each expert, then the final norm and the LM head. Every section's weights live in host
memory (numpy, the slow tier); in fast memory only sections i .. i+K-1 are resident while section i computes,
and section i+K is loaded by a background thread meanwhile. When section i finishes its weights are freed,
and the ring wraps around: the last sections' slots fill with the first sections of the next forward.

Hooks on the section layers do the work (forward pre-hook: wait for the load and attach the weights; post-hook:
free them and start the next load), so the model's own forward runs unchanged and its outputs are those of
all-in-memory inference. The order the sections actually run in is checked on every call: a forward that
skips or reorders a section is an error, not silently slow or wrong.

On CPU both tiers are host memory and a "load" is the copy into a fresh Paddle tensor; on GPU the same copy
goes host to device (pinned host memory would make it asynchronous: untested here).
"""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import paddle

from ppzoo.errors import ConfigError


def moe_gpt_sections(model):
    """[(name, layer)] of a MoEGPTForCausalLM in the order its forward runs them."""
    from ppzoo.nn.moe.layer import MoELayer

    sections = [("embed_tokens", model.embed_tokens)]
    for index, layer in enumerate(model.layers):
        prefix = f"layers.{index}"
        sections += [(f"{prefix}.input_layernorm", layer.input_layernorm), (f"{prefix}.self_attn", layer.self_attn),
                     (f"{prefix}.post_attention_layernorm", layer.post_attention_layernorm)]
        if isinstance(layer.mlp, MoELayer):
            if layer.mlp.expert_provider is not None:
                raise ConfigError("ring-memory inference needs the experts inside the model (no expert storage).")
            sections.append((f"{prefix}.mlp.gate", layer.mlp.gate))
            sections += [(f"{prefix}.mlp.experts.{g}", layer.mlp.expert(g)) for g in layer.mlp.local_expert_indices()]
        else:
            sections.append((f"{prefix}.mlp", layer.mlp))
    sections += [("norm", model.norm), ("lm_head", model.lm_head)]
    return sections


class RingMemoryModel:
    """Wraps `model` (whose sections `sections_of(model)` lists) to run with `slots` resident sections.

    `fast_budget_bytes`, if given, is checked: K + 1 sections (K resident, one loading) of the largest size
    must fit in it."""

    def __init__(self, model, slots, fast_budget_bytes=None, sections_of=moe_gpt_sections):
        self.model = model
        self.sections = sections_of(model)
        n = len(self.sections)
        if not 1 <= slots < n:
            raise ConfigError(f"ring-memory slots={slots} must be between 1 and the number of sections - 1 ({n - 1}).")
        self.slots = slots
        self.params = [list(layer.parameters()) for _, layer in self.sections]
        self.host = [[np.array(p.numpy()) for p in params] for params in self.params]
        self.section_bytes = [sum(a.nbytes for a in arrays) for arrays in self.host]
        self.total_bytes = sum(self.section_bytes)
        need = (slots + 1) * max(self.section_bytes)
        if fast_budget_bytes is not None and need > fast_budget_bytes:
            raise ConfigError(f"ring-memory: {slots} slots (+1 loading) of the largest section ({max(self.section_bytes)} "
                              f"bytes) need {need} bytes, above the fast budget of {fast_budget_bytes}: use fewer slots.")
        for params in self.params:
            for p in params:
                p._clear_data()  # the weights now live in host memory only
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ring-loader")
        self.lock = threading.Lock()
        self.pending = {}
        self.resident = 0
        self.peak_resident = 0
        self.reset_stats()
        self.next_section = 0
        self.handles = []
        for index, (_, layer) in enumerate(self.sections):
            self.handles.append(layer.register_forward_pre_hook(self._pre_hook(index)))
            self.handles.append(layer.register_forward_post_hook(self._post_hook(index)))
        for index in range(slots):
            self._start_load(index)

    def reset_stats(self):
        self.stats = {"bytes_loaded": 0, "wait_s": 0.0, "load_s": 0.0}

    def _load(self, index):
        start = time.perf_counter()
        tensors = [paddle.to_tensor(a) for a in self.host[index]]
        with self.lock:
            self.stats["load_s"] += time.perf_counter() - start
            self.stats["bytes_loaded"] += self.section_bytes[index]
        return tensors

    def _start_load(self, index):
        with self.lock:
            self.resident += self.section_bytes[index]
            self.peak_resident = max(self.peak_resident, self.resident)
        self.pending[index] = self.loader.submit(self._load, index)

    def _pre_hook(self, index):
        def hook(layer, inputs):
            if index != self.next_section:
                raise RuntimeError(f"ring-memory: section {self.sections[index][0]} ran where "
                                   f"{self.sections[self.next_section][0]} was expected; the model's forward must run "
                                   "its sections in the order the ring was built for.")
            start = time.perf_counter()
            tensors = self.pending.pop(index).result()
            self.stats["wait_s"] += time.perf_counter() - start
            for tensor, param in zip(tensors, self.params[index]):
                tensor._share_buffer_to(param)
            self._start_load((index + self.slots) % len(self.sections))  # section i+K loads while i computes
        return hook

    def _post_hook(self, index):
        def hook(layer, inputs, output):
            for param in self.params[index]:
                param._clear_data()
            with self.lock:
                self.resident -= self.section_bytes[index]
            self.next_section = (index + 1) % len(self.sections)
        return hook

    @paddle.no_grad()
    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def close(self):
        """Remove the hooks and put every weight back in the model (all in memory again)."""
        for handle in self.handles:
            handle.remove()
        for future in self.pending.values():
            future.result()
        self.loader.shutdown(wait=True)
        for params, arrays in zip(self.params, self.host):
            for p, a in zip(params, arrays):
                paddle.to_tensor(a)._share_buffer_to(p)
