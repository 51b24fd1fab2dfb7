"""atp inside vLLM: the pruning core of :mod:`atp.core` run in vLLM's model forward."""
