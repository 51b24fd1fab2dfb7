"""Training diagnostics: what the thresholds, the Token metric and the gradients on the threshold
heads say in the first minutes of a run, and warnings when they say the run cannot learn.

>>> from atp.training.diagnostics import summarize, warnings_for
>>> model(**batch)                      # any forward with atp attached
>>> diag = summarize(handle.stats)      # no gradients needed
>>> print(diag.table())
>>> warnings_for(diag)                  # [] when healthy, else Findings (str: the message)

In a training step, :func:`measure_gradients` (before ``loss.backward()``) adds the gradient
norms of the weighted budget terms and of the answer loss on the ATP parameters.
:class:`Recorder` collects both over a step for a training loop (``AtpTrainer`` uses it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from atp.components.budget_loss import average_tokens
from atp.core.stats import PruningStats


class DiagnosticWarning(UserWarning):
    """A training diagnostic says the threshold heads cannot learn as configured."""


@dataclass(frozen=True)
class Limits:
    """When :func:`warnings_for` warns.

    Attributes
    ----------
    spread : a threshold is saturated when its standard deviation over the samples is below this...
    edge : ...and its mean is within this of 0 or 1 (the flat ends of the heads' sigmoid).
    token_gap, token_floor : soft and hard Token disagree when they are apart by more than this
        fraction of the visual tokens and by more than ``token_floor`` tokens (a token within
        1 / T of a threshold is always partly soft; on a model with few visual tokens the
        fraction alone is less than one).
    budget_share : the budget terms' share of the heads' gradient norm above which the answer
        loss is not heard.
    """

    spread: float = 1e-3
    edge: float = 0.01
    token_gap: float = 0.02
    token_floor: float = 1.0
    budget_share: float = 0.99


@dataclass
class Samples:
    """Per-sample numbers of the samples with visual tokens (S of them), K ATP layers.

    ``num_visual`` (S,); ``kept``, ``soft_kept`` (S, K); ``thresholds`` name -> (S, K).
    """

    layers: tuple[int, ...]
    num_layers: int
    num_visual: torch.Tensor
    kept: torch.Tensor
    soft_kept: torch.Tensor
    thresholds: dict[str, torch.Tensor]

    @classmethod
    def of(cls, stats: PruningStats) -> Samples:
        """The detached numbers of ``stats``, samples without visual tokens dropped."""
        rows = stats.num_visual > 0
        soft = stats.soft_kept.detach() if stats.soft_masks else stats.kept.float()
        return cls(
            stats.layers,
            stats.num_layers,
            stats.num_visual[rows],
            stats.kept[rows],
            soft[rows].float(),
            {name: value.detach()[rows].float() for name, value in stats.thresholds.items()},
        )

    @classmethod
    def cat(cls, parts: list[Samples]) -> Samples:
        """The samples of several forwards (of one attached model) in one."""
        first = parts[0]
        names = [name for name in first.thresholds if all(name in part.thresholds for part in parts)]
        return cls(
            first.layers,
            first.num_layers,
            torch.cat([part.num_visual for part in parts]),
            torch.cat([part.kept for part in parts]),
            torch.cat([part.soft_kept for part in parts]),
            {name: torch.cat([part.thresholds[name] for part in parts]) for name in names},
        )


@dataclass
class ThresholdSummary:
    """One threshold at one ATP layer over the samples: mean, standard deviation (population),
    smallest and largest value."""

    mean: float
    std: float
    min: float
    max: float


@dataclass
class GradientNorms:
    """L2 norms of the gradients on the ATP parameters that train, of the weighted budget terms
    (as added to the loss) and of the answer loss (the rest of the loss).

    ``layer_budget`` / ``layer_answer``: the same per ATP layer, over that layer's head (empty
    for a policy without per-layer ``heads``). ``thresholds``: name -> per ATP layer, the norm of
    the whole loss's gradient on the output layer of that threshold (``heads[k].theta_r``), None
    where that threshold does not enter the mask (its branch switched off).
    """

    budget: float
    answer: float
    layer_budget: list[float] = field(default_factory=list)
    layer_answer: list[float] = field(default_factory=list)
    thresholds: dict[str, list[float | None]] = field(default_factory=dict)

    @property
    def share(self) -> float:
        """budget / (budget + answer), 0.0 when both are 0."""
        total = self.budget + self.answer
        return self.budget / total if total > 0 else 0.0


@dataclass
class Diagnostics:
    """What the samples of one step (or forward) say about the threshold heads.

    Attributes
    ----------
    layers : the ATP layer indices (K).
    samples : samples with visual tokens summarised.
    num_visual : their mean visual token count before pruning.
    token_hard, token_soft : the paper's Token metric from the hard kept counts (what inference
        keeps) and from the soft ones (what the budget loss sees), means over the samples.
    kept_hard, kept_soft : per ATP layer, the mean hard / soft kept count.
    thresholds : name -> per ATP layer :class:`ThresholdSummary` (``theta_r``, ``theta_s``).
    gradients : :class:`GradientNorms` when measured, else None.
    """

    layers: tuple[int, ...]
    samples: int
    num_visual: float
    token_hard: float
    token_soft: float
    kept_hard: list[float]
    kept_soft: list[float]
    thresholds: dict[str, list[ThresholdSummary]]
    gradients: GradientNorms | None = None

    def logs(self) -> dict[str, float]:
        """Flat names for a training log: ``atp/token_soft``, ``atp/theta_r/mean/layer4``, ..."""
        logs = {"atp/token_hard": self.token_hard, "atp/token_soft": self.token_soft}
        for k, layer in enumerate(self.layers):
            logs[f"atp/kept_hard/layer{layer}"] = self.kept_hard[k]
            logs[f"atp/kept_soft/layer{layer}"] = self.kept_soft[k]
            for name, summaries in self.thresholds.items():
                for statistic, value in vars(summaries[k]).items():
                    logs[f"atp/{name}/{statistic}/layer{layer}"] = value
        grads = self.gradients
        if grads is not None:
            logs.update({"atp/grad_budget": grads.budget, "atp/grad_answer": grads.answer})
            logs["atp/grad_share_budget"] = grads.share
            for name, norms in grads.thresholds.items():
                found = zip(self.layers, norms)
                logs.update({f"atp/grad/{name}/layer{layer}": n for layer, n in found if n is not None})
        return {key: round(float(value), 6) for key, value in logs.items()}

    def table(self) -> str:
        """One row per ATP layer: kept counts, each threshold's mean +- std [min, max], gradients."""
        names = list(self.thresholds)
        grads = self.gradients
        head = f"{'layer':>5} | {'kept hard':>9} {'kept soft':>9}"
        head += "".join(f" | {name + ' mean +- std [min, max]':>36}" for name in names)
        head += f" | {'grad budget':>11} {'grad answer':>11}" if grads and grads.layer_budget else ""
        rows = [head]
        for k, layer in enumerate(self.layers):
            row = f"{layer:>5} | {self.kept_hard[k]:>9.2f} {self.kept_soft[k]:>9.2f}"
            for name in names:
                s = self.thresholds[name][k]
                row += f" | {f'{s.mean:.4f} +- {s.std:.1e} [{s.min:.4f}, {s.max:.4f}]':>36}"
            if grads and grads.layer_budget:
                row += f" | {grads.layer_budget[k]:>11.3e} {grads.layer_answer[k]:>11.3e}"
            rows.append(row)
        rows.append(
            f"Token: hard {self.token_hard:.2f}, soft {self.token_soft:.2f} of {self.num_visual:.1f} "
            f"visual tokens ({self.samples} samples)"
        )
        if grads is not None:
            rows.append(
                f"gradient on the ATP parameters: budget {grads.budget:.3e}, answer {grads.answer:.3e}, "
                f"budget share {grads.share:.1%}"
            )
        return "\n".join(rows)


def _summary(values: torch.Tensor) -> ThresholdSummary:
    values = values.double()
    return ThresholdSummary(
        float(values.mean()), float(values.std(correction=0)), float(values.min()), float(values.max())
    )


def summarize(stats: PruningStats | Samples, gradients: GradientNorms | None = None) -> Diagnostics | None:
    """The :class:`Diagnostics` of ``stats`` (``handle.stats`` after any forward, or
    :class:`Samples`), over the samples with visual tokens; None when there are none."""
    samples = stats if isinstance(stats, Samples) else Samples.of(stats)
    if samples.num_visual.numel() == 0:
        return None
    args = samples.num_visual, samples.layers, samples.num_layers
    return Diagnostics(
        layers=tuple(samples.layers),
        samples=int(samples.num_visual.numel()),
        num_visual=float(samples.num_visual.double().mean()),
        token_hard=float(average_tokens(samples.kept, *args).double().mean()),
        token_soft=float(average_tokens(samples.soft_kept, *args).double().mean()),
        kept_hard=samples.kept.double().mean(dim=0).tolist(),
        kept_soft=samples.soft_kept.double().mean(dim=0).tolist(),
        thresholds={
            name: [_summary(values[:, k]) for k in range(values.shape[1])]
            for name, values in samples.thresholds.items()
        },
        gradients=gradients,
    )


def _norm(grads: list[torch.Tensor]) -> float:
    total = torch.zeros((), dtype=torch.float64)
    for grad in grads:
        total = total + grad.detach().double().pow(2).sum().cpu()
    return float(total.sqrt())


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], set[int] | None]:
    """d loss / d params (zeros where unused) and the ids of the params in ``loss``'s graph
    (None when ``loss`` has no graph: nothing is known)."""
    if not loss.requires_grad:
        return [torch.zeros_like(p) for p in params], None
    found = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    used = {id(p) for p, g in zip(params, found) if g is not None}
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, found)], used


def measure_gradients(
    policy: torch.nn.Module, budget: torch.Tensor, answer: torch.Tensor
) -> GradientNorms | None:
    """The gradient norms of ``budget`` (the weighted budget terms as added to the loss) and of
    ``answer`` (the loss without them) on ``policy``'s parameters that train; None when none train.

    Two ``torch.autograd.grad`` calls with ``retain_graph=True``: the graph stays for the step's
    own ``backward``, and no ``.grad`` is touched. It costs about one more backward pass. A
    threshold whose output layer is not in the budget terms' graph at all (its branch switched
    off, e.g. ``use_spatial=False``) gets None in ``thresholds``.
    """
    params = [p for p in policy.parameters() if p.requires_grad]
    if not params:
        return None
    (by_budget, used), (by_answer, _) = _grads(budget, params), _grads(answer, params)
    index = {id(p): i for i, p in enumerate(params)}

    def pick(grads, module):
        return [grads[index[id(p)]] for p in module.parameters() if id(p) in index]

    norms = GradientNorms(_norm(by_budget), _norm(by_answer))
    for head in getattr(policy, "heads", ()):
        norms.layer_budget.append(_norm(pick(by_budget, head)))
        norms.layer_answer.append(_norm(pick(by_answer, head)))
        for name, output in head.named_children():
            if not name.startswith("theta"):
                continue
            ids = [id(p) for p in output.parameters() if id(p) in index]
            total = [b + a for b, a in zip(pick(by_budget, output), pick(by_answer, output))]
            in_graph = used is None or any(i in used for i in ids)
            norms.thresholds.setdefault(name, []).append(_norm(total) if ids and in_graph else None)
    return norms


@dataclass(frozen=True)
class Finding:
    """One warning of :func:`warnings_for`: ``kind`` (``saturated``, ``soft_hard``,
    ``budget_dominates``, ``no_gradient``), ``key`` (the kind and what it is about, e.g.
    ``saturated/theta_r/layer4``) and the message (``str(finding)``)."""

    kind: str
    key: str
    message: str

    def __str__(self) -> str:
        return self.message


def warnings_for(diag: Diagnostics, limits: Limits = Limits()) -> list[Finding]:
    """The warnings ``diag`` calls for (empty when healthy); see docs/training.md, Diagnostics."""
    found = []
    for name, summaries in diag.thresholds.items():
        for layer, s in zip(diag.layers, summaries):
            end = 0 if abs(s.mean) < abs(1.0 - s.mean) else 1
            if diag.samples > 1 and s.std < limits.spread and abs(s.mean - end) < limits.edge:
                message = (
                    f"{name} at ATP layer {layer} is saturated: {s.mean:.4f} +- {s.std:.1e} over "
                    f"{diag.samples} samples, stuck near {end} where its sigmoid is flat and the same for "
                    "every input (lower the ATP learning rate, or start the heads away from 0 and 1 with "
                    "init_theta_r / init_theta_s)"
                )
                found.append(Finding("saturated", f"saturated/{name}/layer{layer}", message))
    if abs(diag.token_soft - diag.token_hard) > max(limits.token_gap * diag.num_visual, limits.token_floor):
        message = (
            f"soft and hard Token disagree: soft {diag.token_soft:.2f}, hard {diag.token_hard:.2f}, apart by "
            f"more than {limits.token_gap:.0%} of {diag.num_visual:.1f} visual tokens (and {limits.token_floor:g}); "
            "the budget loss trains counts that inference does not keep (raise the mask temperature)"
        )
        found.append(Finding("soft_hard", "soft_hard", message))
    grads = diag.gradients
    if grads is not None and grads.share > limits.budget_share:
        message = (
            f"the budget terms make {grads.share:.2%} of the gradient on the ATP parameters (budget "
            f"{grads.budget:.2e}, answer {grads.answer:.2e}): the answer loss is not heard and the heads "
            "only chase the token budget (lower lambda_atp / lambda_target)"
        )
        found.append(Finding("budget_dominates", "budget_dominates", message))
    for name, norms in grads.thresholds.items() if grads is not None else ():
        for layer, norm in zip(diag.layers, norms):
            if norm == 0.0:
                message = (
                    f"{name} at ATP layer {layer} gets no gradient: no token's soft mask depends on it "
                    "(a sigmoid flat to float precision, or its branch never decides a token)"
                )
                found.append(Finding("no_gradient", f"no_gradient/{name}/layer{layer}", message))
    return found


CHECKS = {  # kind -> what its OK line says
    "saturated": "no threshold is saturated (each varies over the samples or stays away from 0 and 1)",
    "soft_hard": "soft and hard Token agree",
    "budget_dominates": "the answer loss is heard on the ATP parameters (budget share {share})",
    "no_gradient": "every threshold gets gradient",
}


def verdicts(diag: Diagnostics, found: list[Finding]) -> list[str]:
    """``OK   ...`` per check that passed, ``WARN ...`` per warning, ``--   ...`` per check that
    needs the gradient measurement when there is none."""
    lines = []
    for kind, passed in CHECKS.items():
        mine = [finding for finding in found if finding.kind == kind]
        if mine:
            lines += [f"WARN {finding.message}" for finding in mine]
        elif kind in ("budget_dominates", "no_gradient") and diag.gradients is None:
            lines.append(f"--   not checked without the gradient measurement: {passed.split(' (')[0]}")
        else:
            share = f"{diag.gradients.share:.1%}" if diag.gradients is not None else ""
            lines.append(f"OK   {passed.format(share=share)}")
    return lines


class Recorder:
    """Diagnostics for a training loop: :meth:`record` every training forward's stats, with
    ``step`` the optimizer step (samples of an earlier step are dropped, so the spread is over
    one step's batch), :meth:`record_gradients` now and then, and :meth:`flush` when logging.
    Each warning's ``key`` is raised as a :class:`DiagnosticWarning` once per recorder."""

    def __init__(self, limits: Limits = Limits()):
        self.limits = limits
        self.samples: list[Samples] = []
        self.step: int | None = None
        self.gradients: GradientNorms | None = None
        self.warned: set[str] = set()
        self.last: tuple[int, Diagnostics, list[Finding]] | None = None  # step, diagnostics, findings

    def record(self, stats: PruningStats, step: int) -> None:
        if step != self.step:
            self.samples, self.step = [], step
        samples = Samples.of(stats)
        if samples.num_visual.numel():
            self.samples.append(samples)

    def record_gradients(self, gradients: GradientNorms | None) -> None:
        self.gradients = gradients

    def flush(self) -> tuple[Diagnostics | None, list[Finding]]:
        """The diagnostics of the recorded step and their warnings (warned once per key); the
        gradients are cleared, the samples kept until the next step's first record."""
        gradients, self.gradients = self.gradients, None
        if not self.samples:
            return None, []
        diag = summarize(Samples.cat(self.samples), gradients)
        found = warnings_for(diag, self.limits)
        for finding in found:
            if finding.key not in self.warned:
                self.warned.add(finding.key)
                warnings.warn(finding.message, DiagnosticWarning, stacklevel=2)
        self.last = (self.step, diag, found)
        return diag, found
