"""``AtpTrainer``: transformers' Trainer with ATP parameter groups, budget logging, diagnostics
and ATP-only saving."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
from transformers import Trainer

from atp.host import compat
from atp.host.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_identity,
    load_weights,
    model_identity,
    read_config,
)
from atp.host.handle import CONTAINER_NAME, AtpModules, AttachHandle
from atp.training.diagnostics import Recorder, measure_gradients

POLICY_PREFIX = f"{CONTAINER_NAME}.policy."
FILELOCK_TORCH = (2, 14)  # torch's JIT extension builds lock with an OS-level file lock from here on


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def extension_root() -> Path:
    """The folder torch's ``cpp_extension`` builds JIT ops in, one subfolder per op (as torch
    chooses it: ``TORCH_EXTENSIONS_DIR``, else ``py<version>_<accelerator>`` in the user's cache)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from torch.utils import cpp_extension

    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(cpp_extension.get_default_build_root()) / f"{python}_{accelerator}"


def check_extension_locks() -> None:
    """``ValueError`` naming the stale JIT-build lock files a torch older than 2.14 would wait on
    forever. DeepSpeed builds its ops (the CPU accelerator's ``deepspeed_shm_comm``, ``cpu_adam``,
    ...) with torch's ``cpp_extension`` into a cache shared by every environment of the user. From
    torch 2.14 that build holds an OS-level lock on ``<op>/lock`` and leaves the file; torch 2.13
    takes the file's existence for a build in progress and waits for it to go, so every rank of a
    run in an older environment hangs in ``deepspeed.initialize``. A lock no newer than the built
    library it guards is such a leftover (an older torch removes its lock when its build ends)."""
    if _torch_version() >= FILELOCK_TORCH:
        return
    stale = []
    for lock in extension_root().glob("*/lock"):
        built = [so.stat().st_mtime for so in lock.parent.glob("*.so")]
        if built and lock.stat().st_mtime <= max(built):
            stale.append(str(lock))
    if stale:
        raise ValueError(
            f"torch {torch.__version__} would wait forever on {len(stale)} stale lock file(s) of its extension "
            f"cache: {', '.join(sorted(stale))}. torch >= 2.14 leaves these files after building an op "
            "(DeepSpeed's, in a cache shared with another environment); older torch takes them for a build "
            "in progress. Delete them, or give each environment its own cache with TORCH_EXTENSIONS_DIR"
        )


def find_handle(model: torch.nn.Module) -> AttachHandle:
    container = getattr(model, "_modules", {}).get(CONTAINER_NAME)
    if not isinstance(container, AtpModules) or container.handle is None:
        raise ValueError("AtpTrainer needs a model with atp attached: call atp.attach(model, ...) first")
    return container.handle


class AtpTrainer(Trainer):
    """A ``Trainer`` for models with ATP attached; no custom training loop needed.

    * optimizer groups with their own learning rates: ``atp_learning_rate`` (paper 1e-4) for
      the ATP parameters, ``args.learning_rate`` (paper 2e-5) for the trainable base model;
    * the budget terms are added to ``outputs.loss`` by the attached model, scaled so that the
      accumulated, all-reduced gradient is that of their mean over the global batch (the
      Trainer normalises the LM loss over it; see :meth:`budget_scale`);
    * logs ``atp_loss``, ``target_loss`` and ``avg_tokens`` (means since the last log, over
      all processes) next to ``loss``;
    * diagnostics (:mod:`atp.training.diagnostics`) at every log, over the last step's samples of the
      process: ``atp/theta_r/mean/layer4``, ``.../std/...``, ``atp/token_soft``, ``atp/token_hard``,
      ... and ``atp/warnings`` (how many warnings apply); each warning is raised once as an
      :class:`~atp.training.diagnostics.DiagnosticWarning`. ``atp_diagnostics``: ``"stats"`` (default),
      ``"gradients"`` (or True: also the gradient norms of the budget terms and of the answer
      loss on the ATP parameters, ``atp/grad_share_budget``, measured on the first micro-batch
      with images of each logged step, about one more backward pass; not under DeepSpeed or
      FSDP, whose parameters are sharded), ``"off"`` (or False);
    * saves ``atp_config.json`` + ``atp_model.safetensors`` in every checkpoint, gathered
      from the full state dict (so also under DeepSpeed ZeRO-3 and FSDP with a full state
      dict), plus the full model when the base model is trained; resumes from them.
    """

    def __init__(
        self,
        *args,
        atp_learning_rate: float = 1e-4,
        group_by_modality_length: bool = False,
        atp_diagnostics: str | bool = "stats",
        **kwargs,
    ):
        modes = {True: "gradients", False: "off", "stats": "stats", "gradients": "gradients", "off": "off"}
        if not isinstance(atp_diagnostics, (str, bool)) or atp_diagnostics not in modes:
            raise ValueError(
                f"atp_diagnostics must be 'stats', 'gradients' (or True) or 'off' (or False), got {atp_diagnostics!r}"
            )
        compat.check_trainer(Trainer)
        super().__init__(*args, **kwargs)
        self.atp_handle = find_handle(self.model)
        if self.is_deepspeed_enabled:
            check_extension_locks()  # before deepspeed.initialize builds or loads its ops
        self.atp_learning_rate = atp_learning_rate
        self.group_by_modality_length = group_by_modality_length
        self._atp_sums = torch.zeros(4, dtype=torch.float64)  # atp loss, target loss, tokens, count
        self.atp_diagnostics = modes[atp_diagnostics]
        self.atp_recorder = Recorder()

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = self.atp_handle.param_groups(
                lr=self.args.learning_rate, atp_lr=self.atp_learning_rate, weight_decay=self.args.weight_decay
            )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        runtime = self.atp_handle.runtime
        runtime.budget_scale = self.budget_scale(num_items_in_batch)
        measure = model.training and self._measures_gradients()
        try:
            result = super().compute_loss(model, inputs, return_outputs or measure, num_items_in_batch)
            stats = runtime.last_stats
            images = stats is not None and model.training and bool((stats.num_visual > 0).any())
            if measure and images:
                self._measure_gradients(result[1], stats)
        finally:
            runtime.budget_scale = 1.0  # outside the Trainer, a forward adds the full terms
        if images:
            self._atp_sums += torch.tensor(
                [
                    float(stats.losses["atp"].detach()),
                    float(stats.losses["target"].detach()),
                    stats.avg_tokens,
                    1.0,
                ],
                dtype=torch.float64,
            )
        if model.training and stats is not None and self.atp_diagnostics != "off":
            self.atp_recorder.record(stats, self.state.global_step)
        return result[0] if measure and not return_outputs else result

    def _measures_gradients(self) -> bool:
        """Measure on this micro-batch: gradients asked for, none measured yet for the step the
        next log shows, and parameters that are not sharded."""
        if self.atp_diagnostics != "gradients" or self.atp_recorder.gradients is not None:
            return False
        if self.is_deepspeed_enabled or getattr(self, "is_fsdp_enabled", False):
            if not getattr(self, "_atp_said_sharded", False):
                self._atp_said_sharded = True
                warnings.warn(
                    "atp_diagnostics='gradients': the gradient measurement is off under DeepSpeed and FSDP "
                    "(sharded parameters); the threshold and Token diagnostics are logged",
                    stacklevel=3,
                )
            return False
        step, interval = self.state.global_step + 1, self.state.logging_steps or self.args.logging_steps
        if self.args.logging_strategy != "steps":
            return True  # measured at the first step after each log
        return step % interval == 0 or (step == 1 and self.args.logging_first_step)

    def _measure_gradients(self, outputs, stats) -> None:
        """Split the model's loss into the weighted budget terms it added and the answer loss."""
        runtime = self.atp_handle.runtime
        budget = runtime.budget
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        weighted = loss.new_zeros(())
        if budget.add_to_loss:
            terms = budget.lambda_atp * stats.losses["atp"] + budget.lambda_target * stats.losses["target"]
            weighted = (terms * runtime.budget_scale).to(loss.dtype)
        self.atp_recorder.record_gradients(
            measure_gradients(self.atp_handle.policy, weighted, loss - weighted)
        )

    def budget_scale(self, num_items_in_batch) -> float:
        """The factor that turns the per-micro-batch budget mean into its share of the step.

        The Trainer normalises the LM loss over the whole accumulated (and, across devices,
        global) batch, then does not divide by accumulation steps and multiplies by the number
        of processes before DDP averages; the budget terms are per-micro-batch means, so they
        get the inverse of both (mirroring ``Trainer.training_step`` and ``compute_loss``).
        """
        scale = 1.0
        if compat.loss_scaled_for_accumulation(self, num_items_in_batch):
            scale /= self.current_gradient_accumulation_steps
        if (
            self.args.average_tokens_across_devices
            and (self.model_accepts_loss_kwargs or self.compute_loss_func)
            and num_items_in_batch is not None
        ):
            processes = self.accelerator.num_processes // self.get_tp_size()
            scale /= processes if self.args.n_gpu <= 1 else self.args.n_gpu
        return scale

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            sums = self._atp_sums.to(self.args.device)
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            if sums[3] > 0:
                logs["atp_loss"] = round(float(sums[0] / sums[3]), 6)
                logs["target_loss"] = round(float(sums[1] / sums[3]), 6)
                logs["avg_tokens"] = round(float(sums[2] / sums[3]), 3)
            self._atp_sums.zero_()
            if self.atp_diagnostics != "off":
                diag, found = self.atp_recorder.flush()
                if diag is not None:
                    logs.update(diag.logs())
                    logs["atp/warnings"] = len(found)
        super().log(logs, start_time)

    def _trains_base_model(self) -> bool:
        return any(param.requires_grad for param in self.atp_handle.base_parameters())

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        full = state_dict if state_dict is not None else self.model.state_dict()
        atp_state = {k[len(POLICY_PREFIX) :]: v for k, v in full.items() if k.startswith(POLICY_PREFIX)}
        if self.args.should_save:
            self.atp_handle.save_pretrained(output_dir, state_dict=atp_state or None)
        if self._trains_base_model():
            super()._save(output_dir, state_dict=state_dict)

    def _load_best_model(self) -> None:
        if self._trains_base_model():
            super()._load_best_model()
        best = self.state.best_model_checkpoint
        if best and os.path.isfile(os.path.join(best, CONFIG_NAME)):
            load_weights(self.atp_handle.policy, best)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self._trains_base_model():
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        if os.path.isfile(os.path.join(resume_from_checkpoint, CONFIG_NAME)):
            config = read_config(resume_from_checkpoint)
            check_identity(
                config["model"], model_identity(self.atp_handle.runtime.adapter), resume_from_checkpoint
            )
            if (
                config["layers"] != list(self.atp_handle.layers)
                or config["policy"] != self.atp_handle.config()["policy"]
            ):
                raise ValueError(
                    f"checkpoint {resume_from_checkpoint} has ATP layers {config['layers']} and policy "
                    f"{config['policy']!r}, the attached model {list(self.atp_handle.layers)} and "
                    f"{self.atp_handle.config()['policy']!r}"
                )
            load_weights(self.atp_handle.policy, resume_from_checkpoint)
        elif not self._trains_base_model():
            raise FileNotFoundError(f"no {CONFIG_NAME} / {WEIGHTS_NAME} in {resume_from_checkpoint}")

    def _get_train_sampler(self, train_dataset=None):
        """With ``group_by_modality_length=True``, LLaVA's sampler: each optimizer step's records
        (processes x batch x accumulation) are all text-only or all with images, grouped by length
        (:class:`~atp.training.data.ModalityLengthGroupedSampler`, reshuffled every epoch through
        ``set_epoch``); otherwise the Trainer's own."""
        from atp.training.data import ModalityLengthGroupedSampler

        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.group_by_modality_length:
            self._check_zero3_data(dataset)
            return super()._get_train_sampler(train_dataset)
        if not hasattr(dataset, "image_counts") or not hasattr(dataset, "lengths"):
            raise ValueError(
                "group_by_modality_length needs a dataset with per-record image_counts and lengths "
                f"(atp.training.ConversationDataset), got {type(dataset).__name__}"
            )
        return ModalityLengthGroupedSampler(
            dataset.image_counts,
            dataset.lengths,
            self.args.train_batch_size,
            self.args.world_size * self.args.gradient_accumulation_steps,
            seed=self.args.seed,
            complete=self.is_deepspeed_enabled,  # ZeRO-3 cannot train a step of mixed modalities
        )

    def _check_zero3_data(self, dataset) -> None:
        """Before the first step: ZeRO-3 cannot train a step whose ranks disagree on images (see
        :func:`atp.host.runtime.check_zero3_modalities`), so mixed data needs modality grouping."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if not self.is_deepspeed_enabled or plugin is None or plugin.zero_stage != 3:
            return
        counts = getattr(dataset, "image_counts", None)
        if counts is not None and self.args.world_size > 1 and 0 < int((counts > 0).sum()) < len(counts):
            raise ValueError(
                f"DeepSpeed ZeRO-3 on {self.args.world_size} processes with data that mixes records with "
                "and without images: a step where one rank has images and another none would hang (every "
                "module gathers its weights with a collective when it runs). Group batches by modality: "
                "`atp train --group-by-modality-length` or AtpTrainer(group_by_modality_length=True); or "
                "train with FSDP (configs/accelerate/fsdp.yaml)"
            )
