"""The `search` section of a run config (stage 2)."""

from __future__ import annotations

from pipeline.tasks import Frozen


class SearchConfig(Frozen):
    """How stage 2 searches layer-wise merge coefficients."""
