"""Nebula-I's second phase: translation fine-tuning with knowledge distilled from the pretrained multilingual
LM. Module (registered): NebulaTranslation. The first phase (cross-cluster pretraining) is the Engine with
Distributed.cross_cluster (ppzoo.distributed.cross_cluster)."""
from ppzoo.methods.nebula import translation as _translation  # noqa: F401  (registers NebulaTranslation)
