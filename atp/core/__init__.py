"""The pruning core: what one ATP layer does, as functions over tensors, for any host.

Nothing here imports transformers (or any serving engine): a host (:mod:`atp.host` for transformers)
finds the tensors in its model's forward and hands them to these functions.

* :mod:`atp.core.layout`: moving between the original sequence and a pruned one (gather, scatter,
  masks of a pruned sequence).
* :mod:`atp.core.state`: the state of one prefill (where the visual tokens are, what is alive, the
  current layout), kept for the decode steps that follow it.
* :mod:`atp.core.step`: the ATP layer step, score -> decide -> keep / merge -> new layout, and the
  positions and masks each later layer needs.
* :mod:`atp.core.stats`: what a prefill kept (the paper's Token metric, the budget terms).
* :mod:`atp.core.efficiency`: FLOPs, KV cache and Token of a pruning schedule, from a model's shape.
* :mod:`atp.core.measure`: clocks, intervals and the profiler labels of atp's own work.
"""
