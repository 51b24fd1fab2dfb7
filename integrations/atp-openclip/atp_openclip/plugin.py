"""The plugin module named by the ``atp`` entry point: it registers the scorer."""

from atp.hookspecs import hookimpl
from atp_openclip.scorer import ClipRelevanceScorer


@hookimpl
def atp_register_scorers(register):
    register("clip_relevance", ClipRelevanceScorer)
