"""Online distillation (ERNIE 3.0 Titan): teacher, teacher assistant and students in one engine run, with
On-the-Fly Distillation, attention-distribution KL and Auxiliary Layer Distillation. Module (registered):
"ErnieTitanDistill"."""
from ppzoo.methods.distill.online import (
    OnlineDistillConfig, OnlineDistillModule, StudentSize, TitanStudent, attention_kl, export_student, load_student,
    soft_target_kl,
)

__all__ = ["OnlineDistillConfig", "OnlineDistillModule", "StudentSize", "TitanStudent", "attention_kl",
           "export_student", "load_student", "soft_target_kl"]
