"""Scorers: how important each live visual token is, from one layer's attention."""

from atp.hookspecs import hookimpl
from atp.scorers.base import AttentionView, Scorer
from atp.scorers.last_token import LastTokenScorer, last_token_attention
from atp.scorers.redundancy import RedundancyScorer, cross_scores, self_scores
from atp.scorers.spatial import grid_scores, spatial_scores

__all__ = [
    "LastTokenScorer",
    "last_token_attention",
    "AttentionView",
    "RedundancyScorer",
    "Scorer",
    "cross_scores",
    "grid_scores",
    "self_scores",
    "spatial_scores",
]


@hookimpl
def atp_register_scorers(register):
    register("redundancy", RedundancyScorer)
    register("last_token", LastTokenScorer)
