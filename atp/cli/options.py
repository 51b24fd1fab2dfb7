"""``--option KEY=VALUE``: the policy options every command that attaches atp takes.

:func:`add_option_argument` adds the flag, :func:`parse_options` reads it (one rule for every
command: VALUE is JSON). Used by :mod:`atp.cli.loading`, :mod:`atp.cli.train` and ``atp.study``;
re-exported by :mod:`atp.cli.app`.
"""

from __future__ import annotations

import inspect
import json


def add_option_argument(parser) -> None:
    """``--option KEY=VALUE`` (repeatable), read by :func:`parse_options`."""
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a policy option; VALUE is JSON (e.g. --policy fixed --option keep=[144,72,36], "
        "--option ratio=0.5, --option use_spatial=false), or plain text for an option whose default "
        "is a string (--option threshold_head=binned); repeatable",
    )


def parse_options(pairs: list[str], policy: str | None = None) -> dict:
    """``--option KEY=VALUE`` pairs -> policy options: ``["keep=[144,72]"]`` -> {"keep": [144, 72]}.

    The one rule, for every command: VALUE is read as JSON. An option of ``policy`` whose default
    is a string (threshold_head, scorer, ...) also takes plain text (``threshold_head=binned``);
    for any other option, VALUE that is not JSON is an error with an example, never a guess.
    Names the policy does not take are left to ``atp.attach``, which lists the ones it does.
    """
    known, text = set(), set()
    if policy is not None:
        from atp.plugins import registry

        parameters = inspect.signature(registry().get("policy", policy).factory.__init__).parameters
        known = set(parameters) - {"self", "context"}
        text = {name for name in known if isinstance(parameters[name].default, str)}
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option needs KEY=VALUE, got {pair!r}; e.g. --option keep=[144,72,36]")
        if key in options:
            raise ValueError(f"--option {key} is given twice; give each option once")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError as error:
            if key in text or (policy is not None and key not in known):
                options[key] = value
                continue
            raise ValueError(
                f"--option {pair}: {value!r} is not valid JSON ({error.msg}); VALUE is JSON, e.g. "
                "--option keep=[144,72,36], --option ratio=0.5 or --option use_spatial=false "
                "(quote the whole pair for the shell when it has spaces or brackets)"
            ) from None
    return options
