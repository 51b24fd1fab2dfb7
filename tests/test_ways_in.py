"""Every way into atp refuses what ``atp.attach`` refuses: command line flags, recipe keys, the
dry run, the budget arguments, and the files they name (each error names its file).

The number flags are read from the parsers themselves, so a new flag is covered as soon as it
exists: it must take a checked type of ``atp/arguments.py`` and state its bounds in ``BOUNDS``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import atp
from atp.arguments import Number
from atp.cli.app import build_parser, main
from atp.components.budget_loss import Budget, PaperBudgetLoss

pytestmark = pytest.mark.filterwarnings("ignore:atp.attach")
ROOT = Path(__file__).resolve().parents[1]
BASE = {  # what a command needs besides the flag under test
    "flops": ["--preset", "llava-1.5-7b", "--layers", "4", "--kept", "100"],
    "tiny-checkpoint": ["DIR"],
}
SEED = ("0 4294967295", "-1 4294967296")
FRACTION = ("0.5", "0 1 -0.5 1.5")
BOUNDS = {  # (command, flag): (values accepted, values refused), the intent of each number flag
    **{(command, "--layers"): ("0 4", "-1") for command in ("demo", "visualize", "train", "flops", "bench")},
    **{(command, "--seed"): SEED for command in ("demo", "visualize", "train", "tiny-checkpoint")},
    **{(command, flag): FRACTION for command in ("demo", "visualize") for flag in ("--theta-r", "--theta-s")},
    ("demo", "--max-new-tokens"): ("1", "0 -1"),
    ("visualize", "--size"): ("16", "15 0"),
    ("train", "--lambda-atp"): ("0 0.05", "-0.1"),
    ("train", "--lambda-target"): ("0 0.2", "-0.1"),
    ("train", "--target-tokens"): ("0.5 144", "0 -1"),
    ("train", "--lambda-sample"): ("3", "0 -1"),
    ("train", "--temperature"): ("50", "0 -1"),
    ("train", "--check-steps"): ("1 5", "0 -1"),
    ("train", "--learning-rate"): ("0 2e-5", "-1e-5"),
    ("train", "--atp-learning-rate"): ("0 1e-4", "-1e-4"),
    ("train", "--epochs"): ("0.5 1", "0 -1"),
    ("train", "--max-steps"): ("-1 1", "0 -2"),
    ("train", "--batch-size"): ("1", "0 -1"),
    ("train", "--grad-accum"): ("1", "0 -1"),
    ("train", "--max-length"): ("1", "0 -1"),
    ("train", "--warmup"): ("0 0.03 0.999 1 10", "-0.1 1.5 2.5"),
    ("train", "--save-steps"): ("1", "0 -1"),
    ("train", "--logging-steps"): ("1", "0 -1"),
    ("train", "--workers"): ("0", "-1"),
    ("train", "--num-processes"): ("1", "0 -1"),
    ("eval", "--fraction"): ("0.25", "0 1 1.5"),
    ("eval", "--tokens"): ("0.5 144", "0 -1"),
    ("eval", "--visual-tokens"): ("1", "0 -1"),
    ("eval", "--num-layers"): ("2", "1 0"),
    ("flops", "--kept"): ("0 0.5 100", "-5"),
    ("flops", "--visual-tokens"): ("0.5 576", "0 -1"),
    ("flops", "--text-tokens"): ("0", "-1"),
    ("flops", "--kv-bytes"): ("1", "0"),
    ("bench", "--num-layers"): ("2", "1"),
    ("bench", "--hidden-size"): ("16", "15"),
    ("bench", "--repeats"): ("1", "0"),
    ("bench", "--warmup"): ("0", "-1"),
    ("bench", "--threads"): ("1", "0"),
    ("bench", "--new-tokens"): ("1", "0"),
    ("bench", "--text-tokens"): ("9", "8"),
    ("tiny-checkpoint", "--num-layers"): ("1", "0 -1"),
    ("tiny-checkpoint", "--head-dim"): ("2 32", "1 0 -1"),
    **{("atp.cli.scaling", f): ("1", "0") for f in ("--num-layers", "--hidden-size", "--heads", "--repeats")},
    **{("atp.cli.scaling", f): ("1", "0") for f in ("--new-tokens", "--threads")},
    ("atp.cli.scaling", "--warmup"): ("0", "-1"),
    ("atp.study", "--seeds"): SEED,
}


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every parser a user reaches: the ``atp`` subcommands and the developer tools'."""
    from atp.cli.scaling import build_parser as scaling_parser
    from atp.study.run import build_parser as study_parser

    top = build_parser()
    sub = next(action for action in top._actions if isinstance(action, argparse._SubParsersAction))
    return {**sub.choices, "atp.cli.scaling": scaling_parser(), "atp.study": study_parser()}


def takes_numbers(action: argparse.Action) -> bool:
    return action.type in (int, float) or isinstance(action.type, Number)


def number_flags(kind: type | None = None) -> list:
    """``(command, flag)`` of every flag that takes numbers (of ``kind``: int or float)."""
    return [
        pytest.param(command, action.option_strings[0], id=f"{command} {action.option_strings[0]}")
        for command, parser in parsers().items()
        for action in parser._actions
        if action.option_strings
        and takes_numbers(action)
        and kind in (None, getattr(action.type, "kind", action.type))
    ]


def action_of(command: str, flag: str) -> argparse.Action:
    return next(action for action in parsers()[command]._actions if flag in action.option_strings)


def parse(command: str, argv: list[str]) -> argparse.Namespace:
    if command.startswith("atp."):
        return parsers()[command].parse_args(argv)
    return build_parser().parse_args([command, *BASE.get(command, []), *argv])


def refusal(command: str, argv: list[str], capsys) -> str:
    """What argparse prints as it refuses ``argv`` (exit status 2); the test fails if it accepts."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        parse(command, argv)
    assert exit.value.code == 2
    return capsys.readouterr().err


def exit_code(argv: list[str]) -> int:
    """``atp ARGV``'s exit status: argparse refuses a value (SystemExit), a command returns 2."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def named(action: argparse.Action) -> str:
    """How argparse names the flag in its errors."""
    return f"argument {'/'.join(action.option_strings)}: must be "


# command line flags ------------------------------------------------------------------------------
@pytest.mark.parametrize(("command", "flag"), number_flags())
def test_every_number_flag_takes_a_checked_type_and_states_its_bounds(command, flag):
    action = action_of(command, flag)
    assert isinstance(action.type, Number), (
        f"{command} {flag}: use a type of atp/arguments.py, not {action.type}"
    )
    assert (command, flag) in BOUNDS, f"{command} {flag}: add the values it takes and refuses to BOUNDS"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e999"])
@pytest.mark.parametrize(("command", "flag"), number_flags())
def test_number_flags_refuse_nan_and_infinities(command, flag, value, capsys):
    err = refusal(command, [f"{flag}={value}"], capsys)
    assert named(action_of(command, flag)) in err and f"got {value}" in err


@pytest.mark.parametrize("value", ["2.5", "2.0", "1e3", "true"])
@pytest.mark.parametrize(("command", "flag"), number_flags(int))
def test_count_flags_refuse_fractions_instead_of_truncating_them(command, flag, value, capsys):
    err = refusal(command, [f"{flag}={value}"], capsys)
    assert named(action_of(command, flag)) in err and "an int" in err


@pytest.mark.parametrize(("command", "flag"), list(BOUNDS))
def test_each_number_flag_takes_exactly_its_range(command, flag, capsys):
    accepted, refused = BOUNDS[command, flag]
    action = action_of(command, flag)
    for value in accepted.split():
        parsed = getattr(parse(command, [f"{flag}={value}"]), action.dest)
        assert parsed == ([float(value)] if action.nargs == "+" else float(value)), (flag, value)
    for value in refused.split():
        err = refusal(command, [f"{flag}={value}"], capsys)
        assert named(action) in err and f"got {value}" in err, (flag, value, err)


# recipes -----------------------------------------------------------------------------------------
def train_number_keys(kind: type | None = None) -> list[str]:
    return [
        values[1].removeprefix("--")
        for values in (p.values for p in number_flags(kind))
        if values[0] == "train"
    ]


def read_recipe_values(tmp_path: Path, values: dict) -> argparse.Namespace:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(values))
    return build_parser().parse_args(["train", "--config", str(recipe)])


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "true", "[]", "{a: 1}", "'x'"])
@pytest.mark.parametrize("key", train_number_keys())
def test_recipe_number_keys_refuse_what_their_flag_refuses(tmp_path, capsys, key, value):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"{key}: {value}\n")
    err = refusal("train", ["--config", str(recipe)], capsys)
    assert f"atp train: error: recipe {recipe}: {key} " in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["2.7", "2.0", "'2.5'", "1.0e+3"])
@pytest.mark.parametrize("key", train_number_keys(int))
def test_recipe_count_keys_are_never_truncated(tmp_path, capsys, key, value):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"{key}: {value}\n")
    err = refusal("train", ["--config", str(recipe)], capsys)
    assert f"recipe {recipe}: {key} must be an int" in err and "give" in err


VALUES = st.one_of(
    st.integers(-3, 5000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.sampled_from(["2.5", "16", "1e-5", "nan", "-1", "x"]),
)


@pytest.mark.parametrize("key", train_number_keys())
@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=VALUES)
def test_a_recipe_key_and_its_flag_agree_on_every_value(tmp_path, key, value):
    action = action_of("train", f"--{key}")

    def outcome(read):
        try:
            return getattr(read(), action.dest)
        except SystemExit:
            return "refused"

    flag = outcome(lambda: parse("train", [f"--{key}={value}"]))
    recipe = outcome(lambda: read_recipe_values(tmp_path, {key: value}))
    assert flag == recipe, f"{key}: {value!r} gives {flag!r} as a flag but {recipe!r} in a recipe"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("batch-size:\n", "batch-size has no value; give one (default 16) or leave the key out"),
        ("layers: []\n", "layers is empty; give at least one value"),
        ("model: [a, b]\n", "model must be one value, got a list"),
        ("data: {a: 1}\n", "data must be one value, got a dict"),
        ("resume: yes\n", "resume must be text, got true; quote it ('true')"),
        ("missing-images: 3\n", "missing-images: 3 is not one of error, skip"),
        ("lambda_atp: -1\n", "lambda_atp must be a finite number >= 0, got -1"),
    ],
)
def test_recipe_values_of_the_wrong_shape_are_refused(tmp_path, capsys, text, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    err = refusal("train", ["--config", str(recipe)], capsys)
    assert f"recipe {recipe}: " in err and message in err


def test_a_parser_used_again_forgets_the_last_recipe(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("batch-size: 2\nlayers: [1, 3]\n")
    parser = build_parser()
    assert parser.parse_args(["train", "--config", str(recipe)]).batch_size == 2
    again = parser.parse_args(["train"])
    assert (again.batch_size, again.layers) == (16, None)


@pytest.mark.parametrize(
    "recipe", sorted((ROOT / "configs" / "recipes").glob("*.yaml")), ids=lambda p: p.name
)
def test_the_shipped_recipes_pass_the_checks(recipe):
    args = build_parser().parse_args(["train", "--config", str(recipe)])
    assert args.config == str(recipe) and args.batch_size >= 1


# lmms-eval's --model_args -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"batch_size": 2.7}, "batch_size must be an int >= 1, got 2.7; give a whole number such as 2 or 3"),
        ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
        ({"max_new_tokens": -1}, "max_new_tokens must be an int >= 1, got -1"),
        ({"max_new_tokens": math.nan}, "max_new_tokens must be an int >= 1, got nan"),
        ({"layers": 1.5}, "layers must be an int >= 0, got 1.5"),
        ({"layers": True}, "layers must be an int >= 0, got True; give a number, not true/false"),
        ({"layers": "4;1.5"}, "layers must be an int >= 0, got 1.5"),
        ({"layers": "4;-2"}, r"got -2; give layers as ints separated by ';' \(e.g. layers=4;14;24\)"),
    ],
)
def test_lmms_eval_model_args_are_checked_as_the_flags_are(given, message):
    from atp.evaluation.arguments import parse_model_arguments

    with pytest.raises(ValueError, match=message):
        parse_model_arguments(pretrained="x", policy="atp", **given)
    assert parse_model_arguments(pretrained="x", layers="4;14", batch_size=2).layers == [4, 14]


# the budget arguments ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("given", "error", "message"),
    [
        ({"lambda_atp": math.nan}, ValueError, "lambda_atp must be a finite number >= 0, got nan"),
        ({"lambda_atp": math.inf}, ValueError, "lambda_atp must be a finite number >= 0, got inf"),
        ({"lambda_target": -math.inf, "target_tokens": 4}, ValueError, "lambda_target must be a finite"),
        ({"lambda_atp": "0.05"}, TypeError, r"give the number itself \(0.05\), not a string"),
        ({"lambda_atp": True}, TypeError, "give a number, not true/false"),
        ({"target_tokens": 0}, ValueError, "target_tokens must be a finite number > 0, got 0"),
        ({"target_tokens": -4}, ValueError, "target_tokens must be a finite number > 0"),
        ({"target_tokens": math.nan}, ValueError, "target_tokens must be a finite number > 0, got nan"),
        ({"lambda_target": 0.2, "target_tokens": math.inf}, ValueError, "got inf"),
    ],
)
def test_the_budget_refuses_non_finite_weights_and_non_positive_targets(model, given, error, message):
    with pytest.raises(error, match=message):
        Budget(**given)
    with pytest.raises(error, match=message):
        atp.attach(model, layers=[1], **given)
    assert "atp" not in dict(model.named_children())
    target = given.get("target_tokens")
    if target is not None and not 0 < target < math.inf:  # the loss itself refuses the same targets
        with pytest.raises(error, match=message):
            PaperBudgetLoss(target)


@pytest.mark.parametrize(
    ("field", "flag"),
    [
        ("lambda_atp", "--lambda-atp"),
        ("lambda_target", "--lambda-target"),
        ("target_tokens", "--target-tokens"),
    ],
)
@given(value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10**6)))
def test_the_budget_and_the_train_flags_agree(field, flag, value):
    def accepted(make) -> bool:
        try:
            make()
        except (SystemExit, TypeError, ValueError):
            return False
        return True

    others = {"target_tokens": 1.0} if field == "lambda_target" else {}
    assert accepted(lambda: Budget(**{field: value}, **others)) == accepted(
        lambda: parse("train", [f"{flag}={value!r}"])
    ), (field, value)


# files: every error names the file and says what to do -------------------------------------------
def bad_files(tmp_path: Path) -> dict[str, Path]:
    """One broken file of each kind a flag may name."""
    files = {
        "missing": tmp_path / "missing.yaml",
        "folder": tmp_path / "folder",
        "binary": tmp_path / "binary.yaml",
        "yaml": tmp_path / "broken.yaml",
        "list": tmp_path / "list.yaml",
    }
    files["folder"].mkdir()
    files["binary"].write_bytes(b"model: \xff\xfe\n")
    files["yaml"].write_text("model: [tiny\nbatch-size: 2\n")
    files["list"].write_text("- model\n- tiny\n")
    return files


ADVICE = {
    "missing": "does not exist; check the path",
    "folder": "is a folder; give the path of the",
    "binary": "is not UTF-8 text",
    "yaml": "is not valid YAML at line",
    "list": "it must be a mapping",
}


@pytest.mark.parametrize("problem", list(ADVICE))
def test_a_bad_recipe_file_is_named_with_what_to_do(tmp_path, capsys, problem):
    path = bad_files(tmp_path)[problem]
    err = refusal("train", ["--config", str(path)], capsys)
    assert f"atp train: error: recipe {path} " in err and ADVICE[problem] in err


@pytest.mark.parametrize("problem", list(ADVICE))
def test_a_bad_accelerate_config_is_named_with_what_to_do(tmp_path, capsys, problem):
    path = bad_files(tmp_path)[problem]
    assert exit_code(["train", "--accelerate-config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"atp train: error: accelerate config {path} " in err and ADVICE[problem] in err


@pytest.mark.parametrize(
    ("flag", "text", "message"),
    [
        ("--accelerate-config", "num_processes: 2.5\n", "num_processes must be an int >= 1, got 2.5"),
        ("--accelerate-config", "num_processes: .nan\n", "num_processes must be an int >= 1, got nan"),
        ("--accelerate-config", "num_processes: 0\n", "num_processes must be an int >= 1, got 0"),
        ("--accelerate-config", "deepspeed_config: [1]\n", "deepspeed_config must be a mapping"),
        (
            "--accelerate-config",
            "deepspeed_config: {gradient_accumulation_steps: 2.5}\n",
            "gradient_accumulation_steps must be an int >= 1, got 2.5",
        ),
        ("--deepspeed", '{"gradient_accumulation_steps": "x"}', "gradient_accumulation_steps must be an int"),
        ("--deepspeed", '{"zero_optimization": 3}', "zero_optimization must be a mapping"),
        ("--deepspeed", '{"train_batch_size": 16,}', "is not valid JSON at line 1"),
        ("--deepspeed", "[1, 2]", "it must be a mapping (a JSON object)"),
    ],
)
def test_launch_configs_are_checked_as_the_flags_are(tmp_path, capsys, flag, text, message):
    path = tmp_path / ("launch.json" if flag == "--deepspeed" else "launch.yaml")
    path.write_text(text)
    assert exit_code(["train", flag, str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{path}" in err and message in err and "Traceback" not in err


def test_data_and_image_folder_errors_name_the_path(tmp_path, capsys):
    from atp.tiny.models import write_toy_conversations

    data = write_toy_conversations(tmp_path)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b'[{"id": "\xff"}]')
    base = ["train", "--output-dir", str(tmp_path / "out"), "--dry-run"]
    cases = [
        (
            ["--data", str(tmp_path / "missing.json")],
            f"--data {tmp_path / 'missing.json'} does not exist; give",
        ),
        (["--data", str(tmp_path / "images")], f"--data {tmp_path / 'images'} is a folder; give"),
        (["--data", str(binary)], f"{binary}: not UTF-8 text"),
        (
            ["--data", str(data), "--image-folder", str(tmp_path / "nowhere")],
            f"--image-folder {tmp_path / 'nowhere'} does not exist; give the folder",
        ),
        (
            ["--data", str(data), "--image-folder", str(data)],
            f"--image-folder {data} is a file; give the folder",
        ),
        (
            [
                "--data",
                str(data),
                "--image-folder",
                str(tmp_path / "images"),
                "--resume",
                str(tmp_path / "no"),
            ],
            f"--resume {tmp_path / 'no'} is not a folder; give 'latest'",
        ),
    ]
    for argv, message in cases:
        assert exit_code([*base, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


def test_a_broken_atp_checkpoint_is_named_with_what_to_do(tmp_path, model, capsys):
    folder = tmp_path / "ckpt"
    with atp.attach(model, layers=[1, 3]) as handle:
        handle.save_pretrained(folder)
    weights, config = folder / "atp_model.safetensors", folder / "atp_config.json"
    weights.write_bytes(b"not safetensors")
    with pytest.raises(
        ValueError, match=f"the atp checkpoint weights {re.escape(str(weights))} cannot be read"
    ):
        atp.attach(model, from_pretrained=folder)
    config.write_text('{"format": ')
    with pytest.raises(ValueError, match=f"atp checkpoint config {re.escape(str(config))} is not valid JSON"):
        atp.attach(model, from_pretrained=folder)
    config.write_text("[]")
    with pytest.raises(
        ValueError, match=f"config {re.escape(str(config))} holds a list; it must be a mapping"
    ):
        atp.attach(model, from_pretrained=folder)
    assert "atp" not in dict(model.named_children())
    data = tmp_path / "data.json"
    data.write_text("[]")
    argv = ["train", "--data", str(data), "--output-dir", "x", "--atp-checkpoint", str(tmp_path / "none")]
    assert exit_code([*argv, "--dry-run"]) == 2
    assert f"{tmp_path / 'none'} is not an atp checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"rows": [', "is not valid JSON at line 1"),
        ('{"pretrained": "x"}', "has no 'rows' of methods"),
        ('{"rows": [{"tokens": 1}]}', "has no 'rows' of methods (each with 'method' and 'model_args')"),
        ("[1]", "holds a list; it must be a mapping"),
    ],
)
def test_a_bad_eval_table_is_named_with_what_to_do(tmp_path, capsys, text, message):
    table = tmp_path / "table.json"
    table.write_text(text)
    assert exit_code(["eval", "--from-table", str(table)]) == 2
    err = capsys.readouterr().err
    assert f"atp eval: error: --from-table {table} " in err and message in err


def test_a_good_eval_table_still_prints(tmp_path, capsys):
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"rows": [{"method": "atp", "model_args": "", "tokens": 144.0}]}))
    assert exit_code(["eval", "--from-table", str(table)]) == 0
    assert "| atp |" in capsys.readouterr().out


# the shared type itself --------------------------------------------------------------------------
@given(
    kind=st.sampled_from([int, float]),
    low=st.one_of(st.none(), st.integers(-5, 5)),
    low_open=st.booleans(),
    value=st.one_of(st.integers(-10, 10), st.floats(allow_nan=True, allow_infinity=True), st.booleans()),
)
def test_a_number_accepts_exactly_the_finite_values_of_its_kind_in_range(kind, low, low_open, value):
    number = Number(kind, low=low, low_open=low_open)
    plain = not isinstance(value, bool) and (isinstance(value, int) if kind is int else math.isfinite(value))
    inside = low is None or (value > low if low_open else value >= low)
    expected = plain and inside
    try:
        got = number.check(value)
    except (TypeError, ValueError) as error:
        assert not expected, f"{value!r} refused: {error}"
        assert "must be" in str(error) and "got" in str(error)
        return
    assert expected and got == value and type(got) is kind
    assert number.check(str(value)) == got  # a flag's text reads as the number itself
