"""ERNIE 3.0 Titan: Transformer-XL universal representation module, understanding and generation modules,
credible and controllable generation. Modules (registered): "ErnieTitan" (pretraining), "ErnieTitanNLU"
(classification fine-tuning). Online distillation of Titan: ppzoo.methods.distill."""
from ppzoo.data import ernie_tasks as _ernie_tasks  # noqa: F401  (registers ErnieTitanTasks, TitanTopics)
from ppzoo.models.ernie_titan.generation import (
    TitanCausalLM, continuation_log_likelihood, controllable_generate, credibility_scores, sample_continuations,
)
from ppzoo.models.ernie_titan.model import ErnieTitanConfig, ErnieTitanModel, Memory
from ppzoo.models.ernie_titan.module import ErnieTitanModule, ErnieTitanNLUModule

__all__ = [
    "ErnieTitanConfig", "ErnieTitanModel", "ErnieTitanModule", "ErnieTitanNLUModule", "Memory", "TitanCausalLM",
    "continuation_log_likelihood", "controllable_generate", "credibility_scores", "sample_continuations",
]
