"""``atp doctor``: the versions, whether they are tested, the plugins, and a few-second self-check.

What a user pastes into a bug report. The self-check runs the library's central invariants on a
tiny random LLaVA (no download): keep-all equals the unattached model, drop mode equals mask mode
with the same binary masks, the KV cache shrinks by exactly the pruned tokens, and generate
decodes from the pruned cache. Exit status 1 when a check fails. :func:`add_parser` adds the
command, :func:`main` runs it.
"""

from __future__ import annotations

import json
import time
import traceback
import warnings

import torch

from atp.host import compat


def add_parser(sub) -> None:
    doctor = sub.add_parser(
        "doctor", help="versions, tested range, plugins and a self-check on a tiny model (for bug reports)"
    )
    doctor.add_argument("--json", action="store_true")


def _greedy(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=4, do_sample=False)


def _last_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits[:, -1]


def checks() -> list[tuple[str, callable]]:
    """(name, function) pairs; a function returns a short detail or raises on failure."""
    from atp.host.attach import attach
    from atp.tiny.models import llava_batch, tiny_llava

    model = tiny_llava(num_layers=4)
    batch = llava_batch(model, [([1, 5], [7, 8, 9], 1), ([1, 5, 6, 4], [7, 8], 1)])
    keep = [8, 4]

    def keep_all():
        reference, tokens = _last_logits(model, batch), _greedy(model, batch)
        with attach(model, layers=[1, 3], policy="keep_all"):
            if not torch.equal(_last_logits(model, batch), reference) or not torch.equal(
                _greedy(model, batch), tokens
            ):
                raise AssertionError("keep_all changed the logits or the greedy tokens")
        return "logits and greedy tokens bitwise equal"

    def drop_equals_mask():
        out = {}
        for mode in ("drop", "mask"):
            with attach(model, layers=[1, 3], policy="fixed", keep=keep, prune_mode=mode) as handle:
                out[mode] = (_last_logits(model, batch), _greedy(model, batch), handle.stats.kept.tolist())
        if not out["drop"][2] == out["mask"][2] == [keep, keep]:
            raise AssertionError(f"kept counts differ: drop {out['drop'][2]}, mask {out['mask'][2]}")
        torch.testing.assert_close(out["drop"][0], out["mask"][0], rtol=1e-4, atol=1e-4)
        if not torch.equal(out["drop"][1], out["mask"][1]):
            raise AssertionError("drop and mask modes generate different tokens")
        return f"kept {keep} of 16 in both; logits and greedy tokens agree"

    def cache_shrinks():
        length = batch["input_ids"].shape[1]
        with attach(model, layers=[1, 3], policy="fixed", keep=keep), torch.no_grad():
            out = model.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        cache = compat.output_cache(out)
        widths = [compat.cache_length(cache, layer) for layer in range(4)]
        grown = length + 3 - 1  # the prompt and every generated token but the last
        expected = [grown, grown - 16 + keep[0], grown - 16 + keep[0], grown - 16 + keep[1]]
        if widths != expected:
            raise AssertionError(f"cache widths per layer {widths}, expected {expected}")
        return f"cache widths per layer {widths} after generate"

    return [
        ("keep_all == unattached", keep_all),
        ("drop == mask", drop_equals_mask),
        ("KV cache shrinks while decoding", cache_shrinks),
    ]


def _failure(name: str, error: Exception) -> dict:
    detail = f"{type(error).__name__}: {error}"
    return {"check": name, "ok": False, "detail": detail, "trace": traceback.format_exc()}


def run() -> dict:
    from atp.plugins import registry

    versions = compat.versions()
    tested = compat.tested()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entries = registry().entries()
    plugins = sorted({entry.origin for entry in entries if entry.origin != "atp"})
    results = []
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # untrained heads / policies: by design here
        try:
            found = checks()
        except Exception as error:  # the tiny model itself does not build on this install
            found = []
            results.append(_failure("build the tiny model", error))
        for name, check in found:
            try:
                results.append({"check": name, "ok": True, "detail": check()})
            except Exception as error:
                results.append(_failure(name, error))
    return {
        "versions": versions,
        "tested": tested,
        "tested_range": {
            "transformers": ">={},<{}".format(*compat.TRANSFORMERS_RANGE),
            "torch": ">={},<{}".format(*compat.TORCH_RANGE),
        },
        "components": len(entries),
        "plugins": plugins,
        "plugin_warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
        "checks": results,
        "seconds": round(time.perf_counter() - started, 2),
        "ok": all(result["ok"] for result in results),
    }


def main(args) -> int:
    report = run()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if report["ok"] else 1
    for name, version in report["versions"].items():
        note = ""
        if name in report["tested"]:
            note = "tested" if report["tested"][name] else "NOT TESTED"
            note = f"  ({note}: {report['tested_range'][name]})"
        print(f"{name:<13} {version}{note}")
    print(
        f"components    {report['components']} registered; plugins: {', '.join(report['plugins']) or 'none'}"
    )
    for message in report["plugin_warnings"]:
        print(f"plugin error  {message}")
    for result in report["checks"]:
        print(f"{'ok  ' if result['ok'] else 'FAIL'}  {result['check']}: {result['detail']}")
    print(f"self-check {'passed' if report['ok'] else 'FAILED'} in {report['seconds']} s")
    if not all(report["tested"].values()):
        print(
            "an installed release is outside the tested range: results may be wrong; see docs/compatibility.md"
        )
    if not report["ok"]:
        print("\n".join(result["trace"] for result in report["checks"] if not result["ok"]))
    return 0 if report["ok"] else 1
