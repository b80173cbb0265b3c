"""The `experts` section of a run config (stage 1)."""

from __future__ import annotations

from pipeline.tasks import Frozen


class ExpertsConfig(Frozen):
    """How stage 1 trains one LoRA expert per task."""
