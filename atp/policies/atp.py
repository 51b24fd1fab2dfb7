"""The learned ATP policy (Sec. 3.3): redundancy + spatial scores, per-sample thresholds."""

from __future__ import annotations

from torch import nn

from atp.policies.base import Decision, Policy, PolicyContext, PolicyInput
from atp.policies.options import OptionCheck
from atp.scorers.normalize import minmax_normalize


class AtpPolicy(Policy):
    """S_red = (norm(S_self) + norm(S_cross)) / 2; theta_r, theta_s from a head per ATP layer;
    M = max(sigmoid((S_red - theta_r) T), sigmoid((S_spatial - theta_s) T)).

    Options
    -------
    temperature : T of the soft masks, > 0 (default 100: with scores spaced about 1 / N apart,
        some 6 N / T tokens sit in a sigmoid's transition, and the soft kept counts stay within
        about 1% of the hard ones at N = 144; the paper asks only for "sufficiently large").
    hidden_size : width of each threshold head, >= 1 (default 256).
    init_theta_r, init_theta_s : thresholds of untrained heads, in (0, 1) (default 0.5 and 0.5,
        where the paper's standard-initialised heads start: both branches decide about some
        tokens, so both thresholds get gradient; untrained heads prune about half the tokens).
    lambda_sample : spatial score coefficient, > 0 (default 1: every token of the spatial score
        is spaced 1 / N from the next, so the soft count follows the hard one; the paper's 3
        crowds three quarters of the tokens below 0.25).
    spatial_strides : grid strides (ints >= 1), default (2, 4, 8, ...) up to half the grid side.
    threshold_head : "paper" (fixed input length, the model's visual tokens per sample),
        "binned" (size-agnostic: quantiles of the scores) or "auto" (paper when the family
        fixes the visual token count, binned otherwise); any registered head name.
    bins : quantiles per score for the binned head, >= 2 (default 64).
    scorer, mask_combiner : registered component names (default "redundancy", "max_sigmoid").
    scorer_options : keyword arguments for the scorer.
    use_self, use_cross : ablations of the redundancy score (Table 5): S_red from S_self only,
        S_cross only, or both (default); a switched-off score also reads as 0 in the head input.
    use_redundant, use_spatial : ablations of the mask (Table 4, RP / SP): redundant pruning
        only, spatial pruning only, or both (default).
    """

    name = "atp"

    def __init__(
        self,
        context: PolicyContext,
        temperature: float = 100.0,
        hidden_size: int = 256,
        init_theta_r: float = 0.5,
        init_theta_s: float = 0.5,
        lambda_sample: float = 1.0,
        spatial_strides: tuple[int, ...] | None = None,
        threshold_head: str = "auto",
        bins: int = 64,
        scorer: str = "redundancy",
        scorer_options: dict | None = None,
        mask_combiner: str = "max_sigmoid",
        use_self: bool = True,
        use_cross: bool = True,
        use_redundant: bool = True,
        use_spatial: bool = True,
    ):
        super().__init__(context)
        check = OptionCheck(self.name)
        self.use_self, self.use_cross = check.flag("use_self", use_self), check.flag("use_cross", use_cross)
        if not (self.use_self or self.use_cross):
            raise ValueError(
                "policy 'atp': options use_self and use_cross are both False, but S_red needs at least "
                "one of them; switch one on (or prune by the spatial score only with use_redundant=False)"
            )
        use_redundant = check.flag("use_redundant", use_redundant)
        use_spatial = check.flag("use_spatial", use_spatial)
        if not (use_redundant or use_spatial):
            raise ValueError(
                "policy 'atp': options use_redundant and use_spatial are both False, but the mask needs at "
                "least one of them; switch one on (policy='keep_all' keeps every token)"
            )
        temperature = check.real("temperature", temperature, 0.0, low_open=True)
        hidden_size = check.integer("hidden_size", hidden_size, 1)
        init_theta_r = check.real("init_theta_r", init_theta_r, 0.0, 1.0, True, True)
        init_theta_s = check.real("init_theta_s", init_theta_s, 0.0, 1.0, True, True)
        bins = check.integer("bins", bins, 2)
        self.lambda_sample = check.real("lambda_sample", lambda_sample, 0.0, low_open=True)
        self.spatial_strides = None
        if spatial_strides is not None:
            if not isinstance(spatial_strides, (list, tuple)) or not spatial_strides:
                expected = "None (the default) or a non-empty list of ints >= 1"
                check.fail(
                    "spatial_strides", spatial_strides, expected, TypeError, "spatial_strides=[2, 4, 8]"
                )
            self.spatial_strides = tuple(
                check.integer(f"spatial_strides[{i}]", stride, 1) for i, stride in enumerate(spatial_strides)
            )
        if threshold_head == "auto":
            threshold_head = "paper" if context.num_visual_tokens is not None else "binned"
        head = check.component("threshold_head", threshold_head, "threshold_head")
        scorer_factory = check.component("scorer", scorer, "scorer")
        self.scorer = scorer_factory(**check.keywords("scorer_options", scorer_options, scorer_factory))
        self.heads = nn.ModuleList(
            head.from_options(context.num_visual_tokens, hidden_size, init_theta_r, init_theta_s, bins)
            for _ in context.layers
        )
        combiner = check.component("mask_combiner", mask_combiner, "mask_combiner")
        self.combiner = combiner(temperature, use_redundant=use_redundant, use_spatial=use_spatial)
        self.untrained = True

    def decide(self, inputs: PolicyInput) -> Decision:
        # In training (soft masks) a token the hard decision dropped keeps a soft weight: it is
        # scored and masked again with the live tokens' normalisation, so its cumulative soft mask
        # stays a smooth function of the thresholds; the head reads what inference reads.
        live, present = inputs.live, inputs.weight > 0
        zero = inputs.live.float() * 0.0
        n_self = minmax_normalize(inputs.scores["s_self"], live, present) if self.use_self else zero
        n_cross = minmax_normalize(inputs.scores["s_cross"], live, present) if self.use_cross else zero
        s_redundant = (n_self + n_cross) / (int(self.use_self) + int(self.use_cross))
        theta_r, theta_s = self.heads[inputs.index](n_self * live, n_cross * live, live, inputs.num_visual)
        mask = self.combiner(s_redundant, inputs.spatial, theta_r, theta_s)
        branches = getattr(self.combiner, "branches", None)  # a plugin combiner may not say why
        reasons = branches(s_redundant, inputs.spatial, theta_r, theta_s) if branches else {}
        return Decision(mask, {"theta_r": theta_r, "theta_s": theta_s}, reasons=reasons)
