"""atp-openclip: a CLIP text-image relevance scorer for atp, discovered through the ``atp`` entry point."""

from atp_openclip.scorer import ClipRelevanceScorer

__all__ = ["ClipRelevanceScorer"]
