"""Distillation that recovers N:M models: a pruned student learns from its dense teacher.

``nmsparse.distill(student, teacher, batches, steps=..., lr=...)``; ``nmsparse distill`` on the
command line (see ``docs/distill.md``).
"""

from nmsparse.distillation.blocks import find_blocks
from nmsparse.distillation.loop import DistillReport, distill

__all__ = ["DistillReport", "distill", "find_blocks"]
