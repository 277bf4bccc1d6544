"""ChuXin cut into pipeline stages for fleet's PipelineLayer (GPU only; untested in CI, which has no GPU).

Each piece takes and returns what flows between stages: (hidden, doc_ids) between decoder layers. Every
decoder layer rebuilds its RoPE tables and mask from doc_ids, because a stage sees only its own layers.
Parameter names differ from ChuXinForCausalLM's (PipelineLayer numbers its layers), so a pipeline
checkpoint resumes only with the same pp_degree.
"""
import paddle
import paddle.nn as nn

from ppzoo.distributed.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    mean_over_tokens,
    parallel_cross_entropy,
)
from ppzoo.models.chuxin.model import ChuXinDecoderLayer, attention_inputs
from ppzoo.nn.norm import RMSNorm


class ChuXinEmbeddingPipe(nn.Layer):
    def __init__(self, config, mp_group=None):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, mp_group=mp_group)

    def forward(self, inputs):
        input_ids, doc_ids = inputs
        return self.embed_tokens(input_ids), doc_ids


class ChuXinDecoderLayerPipe(ChuXinDecoderLayer):
    def __init__(self, config, mp_group=None):
        super().__init__(config, mp_group)
        self.config = config

    def forward(self, inputs):
        hidden, doc_ids = inputs
        b, s = doc_ids.shape
        positions = paddle.arange(s, dtype="int64").unsqueeze(0).expand([b, s])
        rope, mask = attention_inputs(self.config, self.self_attn, positions, doc_ids, None, hidden.dtype)
        return super().forward(hidden, rope, mask), doc_ids


class ChuXinHeadPipe(nn.Layer):
    def __init__(self, config, mp_group=None):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = ColumnParallelLinear(config.hidden_size, config.vocab_size, mp_group=mp_group)

    def forward(self, inputs):
        hidden, _ = inputs
        return self.lm_head(self.norm(hidden))


class ChuXinPipeLoss(nn.Layer):
    def __init__(self, mp_group=None):
        super().__init__()
        self.mp_group = mp_group

    def forward(self, logits, labels):
        return mean_over_tokens(parallel_cross_entropy(logits, labels, mp_group=self.mp_group), labels)


def pipeline_description(config, mp_group):
    """[(layer class, args, kwargs), ...] and the loss layer, for ppzoo.distributed.gpu_parallel."""
    layers = [(ChuXinEmbeddingPipe, (config,), {"mp_group": mp_group})]
    layers += [(ChuXinDecoderLayerPipe, (config,), {"mp_group": mp_group}) for _ in range(config.num_layers)]
    layers.append((ChuXinHeadPipe, (config,), {"mp_group": mp_group}))
    return layers, ChuXinPipeLoss(mp_group)
