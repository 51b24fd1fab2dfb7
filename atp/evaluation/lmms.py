"""The ``atp`` lmms-eval model: a transformers VLM loaded with :func:`atp.cli.loading.load`, with or
without atp attached, answering ``generate_until`` and ``loglikelihood`` requests in batches.

Every answer carries the request's kept tokens (:mod:`atp.evaluation.tokens`). Under
``accelerate launch`` each process takes its rank and world size from accelerate and runs on
its own device, the way lmms-eval's built-in models do.
"""

from __future__ import annotations

import time
from argparse import Namespace

import torch

from atp.evaluation.arguments import parse_model_arguments
from atp.evaluation.batches import batches, prompt_for, visuals_of

try:
    from lmms_eval.api.instance import GenerationResult
    from lmms_eval.api.model import lmms
    from lmms_eval.models.model_utils.gen_metrics import log_metrics

    from atp.evaluation.tokens import KeptTokenCounts, TokenLedger
except ImportError as error:  # missing, or broken (e.g. filelock 4 removed filelock._api)
    raise ImportError(
        f'the atp lmms-eval model needs lmms-eval 0.7 (>=0.7.3,<0.8): pip install "atp[eval]" ({error})'
    ) from error


class AtpLMM(lmms):
    """``--model atp --model_args pretrained=PATH_OR_ID[,policy=NAME,layers=4;14;24,option.KEY=VALUE]``."""

    def __init__(self, **kwargs) -> None:
        super().__init__()
        from atp.cli.loading import attach_from_args, device_of, load
        from atp.host.attach import resolve_adapter

        kwargs.pop("max_batch_size", None)
        self.args = args = parse_model_arguments(**kwargs)
        self.accelerator = _accelerator()
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        device = args.device
        if self._world_size > 1 and torch.cuda.is_available():
            device = f"cuda:{self.accelerator.local_process_index}"
        loaded = load(
            args.pretrained, args.dtype, device_of(Namespace(device=device)), args.attn_implementation
        )
        self.model, self.processor = loaded.model, loaded.processor
        self._device = self.model.device  # lmms-eval reads lm.device under data parallel
        self.processor.tokenizer.padding_side = "left"
        self.handle = None
        if args.prunes:
            namespace = Namespace(
                policy=args.policy,
                layers=args.layers,
                option=args.options,
                atp_checkpoint=args.atp_checkpoint,
            )
            self.handle = attach_from_args(self.model, namespace)
        self.adapter = resolve_adapter(self.model) if self.handle is None else None
        self.batch_size = args.batch_size
        self.ledger = TokenLedger()

    @property
    def device(self) -> torch.device:
        return self._device

    # requests ---------------------------------------------------------------------------
    def generate_until(self, requests) -> list:
        return self._generate(requests, self._simple_prompt, settings_index=1)

    def _simple_prompt(self, arg) -> tuple[str, list]:
        """``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``: the images, then the context."""
        images = visuals_of(self, arg)
        return prompt_for(self.processor, arg[0], len(images))[0], images

    def _generate(self, requests, prompt_of, settings_index: int) -> list:
        answers = [None] * len(requests)
        for indices, gen_kwargs in batches(requests, self.batch_size, settings_index):
            prompts, visuals = zip(*(prompt_of(requests[i].args) for i in indices))
            until, settings = self._generation_settings(gen_kwargs)
            inputs = self._inputs(list(prompts), list(visuals))
            start = time.perf_counter()
            with torch.inference_mode():
                output = self.model.generate(**inputs, **settings)
            self.ledger.elapsed += time.perf_counter() - start
            new = output[:, inputs["input_ids"].shape[1] :]
            counts = self._counts(inputs)
            for row, index in enumerate(indices):
                text = self.processor.tokenizer.decode(new[row], skip_special_tokens=True)
                for stop in until:
                    text = text.split(stop)[0] if stop else text
                generated = int((new[row] != self.processor.tokenizer.pad_token_id).sum())
                if not requests[index].metadata.get("__padding_only__"):
                    self.ledger.generated += generated
                answers[index] = self._answer(requests[index], text, counts[row], inputs, row, generated)
        return answers

    def loglikelihood(self, requests) -> list:
        answers = [None] * len(requests)
        tokenizer = self.processor.tokenizer
        for indices, _ in batches(requests, self.batch_size, settings_index=None):
            args = [requests[i].args for i in indices]
            visuals = [visuals_of(self, arg) for arg in args]
            fulls, lengths = [], []
            for arg, images in zip(args, visuals):
                continuation = arg[1] if isinstance(arg[1], str) else arg[1](self._doc(arg))
                prompt, _ = prompt_for(self.processor, arg[0], len(images))
                lengths.append(
                    len(tokenizer(prompt + continuation).input_ids) - len(tokenizer(prompt).input_ids)
                )
                fulls.append(prompt + continuation)
            if min(lengths) < 1:
                raise ValueError("a loglikelihood request has an empty continuation after tokenization")
            inputs = self._inputs(fulls, visuals)
            with torch.inference_mode():
                logits = self.model(**inputs).logits.float()  # (B, L, V), aligned with input_ids
            counts = self._counts(inputs)
            for row, (index, n) in enumerate(zip(indices, lengths)):
                targets = inputs["input_ids"][row, -n:]  # left padding: the continuation ends every row
                predicted = logits[row, -n - 1 : -1].log_softmax(-1)  # (n, V)
                nll = -predicted.gather(-1, targets[:, None]).mean()
                greedy = bool((predicted.argmax(-1) == targets).all())
                # lmms-eval's convention (its multiple_choice takes the argmin): the mean loss
                answers[index] = self._answer(
                    requests[index], (float(nll), greedy), counts[row], inputs, row, 0
                )
        return answers

    def generate_until_multi_round(self, requests) -> list:
        raise NotImplementedError(
            "the atp model answers generate_until and loglikelihood (multiple_choice) tasks"
        )

    def clean(self):
        """Called by lmms-eval on every rank after the last request: report the Token metric."""
        summary, elapsed, generated = self.ledger.summary()
        if summary and self.rank == 0:
            log_metrics(elapsed, generated, generated / elapsed if elapsed > 0 else 0.0, summary)
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        super().clean()

    # helpers ------------------------------------------------------------------------------
    def _doc(self, arg):
        *_, doc_id, task, split = arg
        return self.task_dict[task][split][doc_id]

    def _inputs(self, texts: list[str], visuals: list[list]) -> dict:
        flat = [image for images in visuals for image in images]
        inputs = self.processor(text=texts, images=flat or None, padding=True, return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        return {
            k: (v.to(self.model.device, dtype) if v.is_floating_point() else v.to(self.model.device))
            for k, v in inputs.items()
        }

    def _counts(self, inputs) -> list[tuple[list[int], int, float]]:
        """Per row: kept after each ATP layer (K,), visual tokens, Token metric, from atp's stats or (unpruned) the adapter."""
        if self.handle is not None:
            stats = self.handle.stats
            return list(zip(stats.kept.tolist(), stats.num_visual.tolist(), stats.tokens_per_sample.tolist()))
        visual = self.adapter.visual_layout(inputs["input_ids"], inputs, {}).visual.sum(dim=1).tolist()
        return [([], n, float(n)) for n in visual]

    def _answer(self, request, value, counts, inputs, row, generated: int):
        kept, num_visual, avg_tokens = counts
        if not request.metadata.get("__padding_only__"):
            self.ledger.add(request.task_name, request.doc_id, float(avg_tokens))
        token_counts = KeptTokenCounts(
            input_tokens=int(inputs["attention_mask"][row].sum()),
            output_tokens=generated,
            kept_tokens=[int(k) for k in kept],
            avg_tokens=float(avg_tokens),
        )
        return GenerationResult(text=value, token_counts=token_counts)

    def _generation_settings(self, gen_kwargs: dict) -> tuple[list[str], dict]:
        gen_kwargs = dict(gen_kwargs)
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        new_tokens = self.args.max_new_tokens or int(gen_kwargs.get("max_new_tokens", 32))
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        settings = {
            "max_new_tokens": new_tokens,
            "do_sample": temperature > 0,
            "num_beams": int(gen_kwargs.get("num_beams", 1) or 1),
        }
        if temperature > 0:
            settings.update(temperature=temperature, top_p=float(gen_kwargs.get("top_p") or 1.0))
        settings["pad_token_id"] = self.processor.tokenizer.pad_token_id
        return until, settings

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """As lmms-eval's, but ``--model_args`` win over the command line's ``--batch_size`` / ``--device``
        instead of clashing with them."""
        from lmms_eval.utils import simple_parse_args_string

        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **simple_parse_args_string(arg_string)})


class AtpChatLMM(AtpLMM):
    """``--model atp_chat``: lmms-eval's chat request type. Each document's messages come from the
    task's ``doc_to_messages`` (lmms-eval builds them from ``doc_to_visual`` and ``doc_to_text``
    when a task has none), so images sit where the task puts them, between texts or in several
    turns, and the processor's chat template renders them. lmms-eval gives chat models
    generation requests only: log-likelihood (``multiple_choice``) tasks run with ``--model atp``.
    """

    is_simple = False

    def generate_until(self, requests) -> list:
        return self._generate(requests, self._chat_prompt, settings_index=2)

    def _chat_prompt(self, arg) -> tuple[str, list]:
        """``(context, doc_to_messages, gen_kwargs, doc_id, task, split)``: the messages' images in
        order, and the chat template over the messages."""
        from lmms_eval.protocol import ChatMessages

        messages = arg[1](self._doc(arg)) if callable(arg[1]) else arg[1]
        chat = ChatMessages(messages=messages)
        images, videos, audios = chat.extract_media()
        if videos or audios:
            raise ValueError(
                f"the atp_chat model takes text and images; task {arg[4]!r} sends "
                f"{'videos' if videos else 'audio'}"
            )
        images = [_image(image) for image in images]
        if getattr(self.processor, "chat_template", None) is None:
            prompt_for(self.processor, "", 0)  # raises, naming what to do
        prompt = self.processor.apply_chat_template(
            chat.to_hf_messages(), add_generation_prompt=True, tokenize=False
        )
        return prompt, images

    def loglikelihood(self, requests) -> list:
        raise NotImplementedError(
            "lmms-eval sends log-likelihood requests to simple models only: run multiple_choice "
            "tasks with --model atp"
        )


def _image(image):
    """A message's image (PIL, or a path to one) as RGB."""
    if isinstance(image, str):
        from PIL import Image

        image = Image.open(image)
    if not hasattr(image, "convert"):
        raise ValueError(f"the atp_chat model takes PIL images or image paths, got {type(image).__name__}")
    return image.convert("RGB")


def _accelerator():
    from accelerate import Accelerator

    return Accelerator()
