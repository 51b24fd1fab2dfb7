"""The transformers host: atp attached to a Hugging Face model through hooks.

* :mod:`atp.host.attach`: ``atp.attach`` / ``atp.detach``, the checks before anything changes.
* :mod:`atp.host.handle`: the handle ``attach`` returns (stats, saving, removing).
* :mod:`atp.host.generate`: ``model.generate`` while attached (the modes atp follows, checked first).
* :mod:`atp.host.runtime`: the hooks, which hand each forward's tensors to :mod:`atp.core`.
* :mod:`atp.host.calls`: what kind of call a forward is (prefill, decode, continuation) and the
  checks of its cache.
* :mod:`atp.host.strategies`: what the layers after an ATP layer receive, ``drop`` (pruned tokens
  removed) or ``mask`` (kept in place, masked as keys).
* :mod:`atp.host.recurrent`: recurrent layers (linear attention, no keys to mask) in mask mode:
  they run on the kept tokens only, as in drop mode.
* :mod:`atp.host.distributed`: DDP / FSDP / ZeRO-3 and gradient-checkpointing concerns.
* :mod:`atp.host.compat`: everything atp knows about transformers' internals (one place).
* :mod:`atp.host.attention`: atp's attention function (it hands queries and keys to the scorer).
* :mod:`atp.host.checkpoint`: saving and restoring trained ATP modules (safetensors).

Family knowledge (where a model keeps its visual tokens, its positions) lives in
:mod:`atp.backbones`.
"""
