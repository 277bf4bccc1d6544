"""The pipeline-parallel description of ChuXin (its stages run by fleet's PipelineLayer on GPU) computes the
same function as the plain model: chained on one CPU process with the same weights, the logits and loss agree."""
import numpy as np
import paddle

import ppzoo  # noqa: F401
from ppzoo.distributed.tensor_parallel import mean_over_tokens, parallel_cross_entropy
from ppzoo.models.chuxin.model import ChuXinConfig, ChuXinForCausalLM
from ppzoo.models.chuxin.pipeline import pipeline_description


def test_pipeline_stages_equal_the_model():
    paddle.seed(3)
    config = ChuXinConfig(vocab_size=96, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                          intermediate_size=64)
    model = ChuXinForCausalLM(config)
    descriptions, loss_layer = pipeline_description(config, None)
    stages = [cls(*args, **kwargs) for cls, args, kwargs in descriptions]
    assert len(stages) == config.num_layers + 2
    stages[0].set_state_dict({"embed_tokens.weight": model.model.embed_tokens.weight})
    for stage, layer in zip(stages[1:-1], model.model.layers):
        stage.set_state_dict(layer.state_dict())
    stages[-1].set_state_dict({"norm.weight": model.model.norm.weight, "lm_head.weight": model.lm_head.weight})

    rng = np.random.default_rng(0)
    ids = paddle.to_tensor(rng.integers(0, 96, size=(2, 10)))
    doc_ids = paddle.to_tensor([[0] * 4 + [1] * 6, [0] * 10], dtype="int32")
    labels = paddle.to_tensor(rng.integers(0, 96, size=(2, 10)))

    flowing = (ids, doc_ids)
    for stage in stages:
        flowing = stage(flowing)
    expected = model(ids, doc_ids=doc_ids)
    np.testing.assert_allclose(flowing.numpy(), expected.numpy(), atol=1e-5)
    expected_loss = mean_over_tokens(parallel_cross_entropy(expected, labels), labels)
    np.testing.assert_allclose(float(loss_layer(flowing, labels)), float(expected_loss), atol=1e-6)
