"""Tools: fit contrastive models, predict expression, score predictions."""

from __future__ import annotations

__all__: list[str] = []
