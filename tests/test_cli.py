"""The command line: demo, plugins, models."""

from __future__ import annotations

import json

import pytest

from atp.cli.app import main, parse_options
from atp.tiny.models import tiny_llava


def exit_code(argv: list[str]) -> int:
    """``atp ARGV``'s exit status: argparse refuses a flag's value (SystemExit), a command returns 2."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def test_demo_prunes_the_tiny_llava_and_reports_consistent_numbers(capsys):
    assert main(["demo", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["visual_tokens"] == 576 and result["layers"] == [4, 14, 24] and result["num_layers"] == 32
    kept = result["kept"]
    assert 576 > kept[0] >= kept[1] >= kept[2] > 0
    expected = (4 * 576 + 10 * kept[0] + 10 * kept[1] + 8 * kept[2]) / 32
    assert result["avg_tokens"] == pytest.approx(expected)
    assert len(result["generated"]) == 8
    # the KV line agrees with the counts: the removed cache is the removed visual tokens, layer by layer
    removed_tokens = 32 * 576 - round(expected * 32)  # token-layers dropped from the cache
    removed_bytes = result["kv_cache_bytes_full"] - result["kv_cache_bytes"]
    per_token = removed_bytes // removed_tokens  # bytes of one token in one layer's cache
    assert removed_bytes == removed_tokens * per_token > 0
    cached = result["kv_cache_bytes_full"] / (32 * per_token)  # prompt + generated - 1 tokens
    assert cached == 576 + 11 + len(result["generated"]) - 1


def test_demo_table_and_bad_arguments(capsys):
    assert main(["demo", "--policy", "fixed"]) == 2  # fixed needs keep=[...]
    assert "needs keep" in capsys.readouterr().err
    assert main(["demo", "--layers", "4", "14"]) == 0
    out = capsys.readouterr().out
    assert "the paper's 'Token' metric" in out and "KV cache after generate" in out and "4-13" in out


def test_plugins_and_models_list_the_registry(capsys):
    assert main(["plugins"]) == 0
    listing = capsys.readouterr().out
    assert "policy" in listing and "keep_all" in listing and "threshold_head" in listing
    assert main(["models", "--json"]) == 0
    families = {entry["family"] for entry in json.loads(capsys.readouterr().out)}
    assert {"llava", "qwen2_vl", "mistral3"} <= families


def test_demo_takes_policy_options(capsys):
    assert main(["demo", "--json", "--policy", "fixed", "--option", "keep=[144, 72, 36]"]) == 0
    assert json.loads(capsys.readouterr().out)["kept"] == [144, 72, 36]
    assert main(["demo", "--policy", "fastv", "--layers", "2", "--option", "ratio=0.75", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kept"] == [144]
    assert main(["demo", "--option", "keep"]) == 2
    assert "--option needs KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--policy", "fixed", "--option", "keep=notjson"],
            "--option keep=notjson: 'notjson' is not valid JSON (Expecting value); VALUE is JSON, "
            "e.g. --option keep=[144,72,36]",
        ),
        (["--policy", "fastv", "--option", "ratio=half"], "'half' is not valid JSON"),
        (
            ["--policy", "fixed", "--option", "keep=0.5"],
            "policy 'fixed': option keep must be a list with one count or fraction per ATP layer "
            "(layers [4, 14, 24]), got 0.5; e.g. keep=[0.5, 0.5, 0.5]",
        ),
        (
            ["--policy", "fixed", "--option", "keep=[144,72,300]"],
            "option keep[2] = 300 is more than keep[1] = 72",
        ),
        (
            ["--option", "colour=red"],
            "policy 'atp' does not take option(s) colour; its options are: temperature",
        ),
        (["--option", "bins=1", "--option", "bins=2"], "--option bins is given twice; give each option once"),
        (
            ["--option", "threshold_head=tiled"],
            "option threshold_head must be a registered threshold_head name, one of: binned, constant, paper",
        ),
    ],
)
def test_demo_refuses_bad_options_before_running_anything(capsys, monkeypatch, argv, message):
    import atp.cli.demo

    def model_that_must_not_run(**kwargs):
        model = tiny_llava(num_layers=32, image_size=32)
        model.generate = lambda *a, **k: pytest.fail("the demo generated before refusing its options")
        return model

    monkeypatch.setattr(atp.cli.demo, "tiny_llava", model_that_must_not_run)
    assert main(["demo", *argv]) == 2
    captured = capsys.readouterr()
    # a message, not a traceback (DeepSpeed announces its accelerator on stderr when the command
    # is the first to import it, so the message is the last line, not the only one)
    assert captured.err.splitlines()[-1].startswith("atp demo: error: ") and message in captured.err
    assert "Traceback" not in captured.err


def test_option_values_are_json_and_plain_text_only_for_string_options():
    assert parse_options(["keep=[144, 72]", "ratio=0.5", "use_spatial=false", 'scorer="redundancy"']) == {
        "keep": [144, 72],
        "ratio": 0.5,
        "use_spatial": False,
        "scorer": "redundancy",
    }
    assert parse_options(["threshold_head=binned", "scorer=redundancy", "bins=8"], "atp") == {
        "threshold_head": "binned",
        "scorer": "redundancy",
        "bins": 8,
    }
    for pairs, policy in [
        (["keep=notjson"], "fixed"),
        (["bins=eight"], "atp"),
        (["threshold_head=binned"], None),
    ]:
        with pytest.raises(ValueError, match=r"is not valid JSON .*e.g. --option keep=\[144,72,36\]"):
            parse_options(pairs, policy)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--image", "/nonexistent/picture.png"], "atp demo: error"),
        (["bench", "--repeats", "0"], "argument --repeats: must be an int >= 1, got 0"),
        (["bench", "--threads", "0"], "argument --threads: must be an int >= 1, got 0"),
        (["bench", "--warmup", "-1"], "argument --warmup: must be an int >= 0, got -1"),
        (["bench", "--device", "cuda"], "no CUDA device is available"),
        (
            ["train", "--model", "tiny", "--data", "/nonexistent.json", "--output-dir", "/tmp/x"],
            "atp train: error",
        ),
        (
            ["flops", "--preset", "llava-1.5-7b", "--layers", "4", "--kept", "100", "--kv-bytes", "0"],
            "argument --kv-bytes: must be an int >= 1, got 0",
        ),
        (["demo", "--policy", "random"], "the 'random' policy needs keep"),
    ],
)
def test_bad_command_lines_end_with_a_message_not_a_traceback(capsys, argv, message):
    assert exit_code(argv) == 2
    assert message in capsys.readouterr().err


def test_flops_reads_fractions_as_the_fixed_policy_does(capsys):
    assert (
        main(["flops", "--preset", "llava-1.5-7b", "--layers", "4", "14", "--kept", "0.5", "0.25", "--json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["kept"] == [288.0, 72.0]


@pytest.mark.parametrize(
    ("kept", "message"),
    [
        (
            "88 126 300",
            "kept[1] = 126 (after ATP layer 14) is more than the 88 tokens kept at ATP layer 4: "
            "kept counts can only shrink or stay from one ATP layer to the next; give at most 88",
        ),
        ("nan 88 20", "argument --kept: must be a finite number >= 0, got nan"),
        ("126 inf 20", "argument --kept: must be a finite number >= 0, got inf"),
        ("-5 0 0", "argument --kept: must be a finite number >= 0, got -5"),
        ("100 0.5 60", "kept[2] = 60 (after ATP layer 24) is more than the 50 tokens kept at ATP layer 14"),
        ("126 88", "3 ATP layers but 2 kept counts; give one kept count per ATP layer"),
    ],
)
def test_flops_refuses_impossible_schedules(capsys, kept, message):
    argv = ["flops", "--preset", "llava-1.5-7b", "--layers", "4", "14", "24", "--kept", *kept.split()]
    assert exit_code(argv) == 2
    captured = capsys.readouterr()
    assert f"atp flops: error: {message}" in captured.err and not captured.out


def test_flops_refuses_non_finite_token_counts(capsys):
    base = ["flops", "--preset", "llava-1.5-7b", "--layers", "4", "--kept", "100"]
    assert exit_code([*base, "--visual-tokens", "nan"]) == 2
    assert "argument --visual-tokens: must be a finite number > 0, got nan" in capsys.readouterr().err
    assert exit_code([*base, "--text-tokens", "inf"]) == 2
    assert "argument --text-tokens: must be a finite number >= 0, got inf" in capsys.readouterr().err


def test_train_reports_missing_images_before_loading_anything(tmp_path, capsys):
    from atp.tiny.models import write_toy_conversations

    data = write_toy_conversations(tmp_path, images=2, text_only=1)
    (tmp_path / "images" / "1.png").unlink()
    assert (
        main(
            [
                "train",
                "--model",
                "tiny",
                "--data",
                str(data),
                "--image-folder",
                str(tmp_path / "images"),
                "--output-dir",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    assert "1 images not found" in capsys.readouterr().err


def test_doctor_reports_versions_range_plugins_and_a_passing_self_check(capsys):
    from atp.host import compat

    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["transformers"] == compat.versions()["transformers"]
    assert report["tested"] == {"torch": True, "transformers": True}
    assert "atp-openclip 0.1.0" in report["plugins"]
    assert [c["check"] for c in report["checks"]] == [
        "keep_all == unattached",
        "drop == mask",
        "KV cache shrinks while decoding",
    ]
    assert report["ok"] and all(c["ok"] for c in report["checks"])
    assert main(["doctor"]) == 0
    table = capsys.readouterr().out
    assert "transformers" in table and "(tested: >=" in table and "self-check passed" in table


def test_doctor_fails_when_atp_cannot_see_the_cache(capsys, monkeypatch):
    from atp.host import compat

    monkeypatch.setattr(compat, "find_cache", lambda args, kwargs: None)  # as after a rename
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  KV cache shrinks while decoding: CompatibilityError" in out
    assert "self-check FAILED" in out
