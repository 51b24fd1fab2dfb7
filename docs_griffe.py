"""A griffe extension for the documentation site (mkdocs.yml), not part of the package.

atp's numpy-style docstrings put the description on the parameter's line (``name : what it is``;
the type is in the signature). numpydoc reads the text after the colon as a type, so before
mkdocstrings parses a docstring each such line becomes ``name`` with the description indented
below it; a policy's ``Options`` section (its keyword arguments) is shown as "Other Parameters";
Sphinx roles (``:class:`X```) become code.
"""

from __future__ import annotations

import re

import griffe

SECTIONS = {
    "Parameters",
    "Attributes",
    "Options",
    "Other Parameters",
    "Returns",
    "Raises",
    "Yields",
    "Examples",
}
ENTRIES = {"Parameters", "Attributes", "Options", "Other Parameters"}
ROLE = re.compile(r":(?:class|meth|func|mod|data|attr|obj):`~?([^`]+)`")
ENTRY = re.compile(r"^(?P<name>\**[A-Za-z_][\w.]*(?:, \**[A-Za-z_][\w.]*)*) : (?P<text>.+)$")


def rewrite(text: str) -> str:
    """``name : description`` -> ``name`` + indented ``description`` in the parameter sections."""
    out, section, lines = [], None, ROLE.sub(r"`\1`", text).splitlines()
    for index, line in enumerate(lines):
        following = lines[index + 1] if index + 1 < len(lines) else ""
        if line.strip() in SECTIONS and following.strip() and set(following.strip()) == {"-"}:
            section = line.strip()
            if section == "Options":
                line = line.replace("Options", "Other Parameters")
                lines[index + 1] = following.replace(following.strip(), "-" * len("Other Parameters"))
        match = ENTRY.match(line) if section in ENTRIES else None
        if match:
            out += [match["name"], f"    {match['text']}"]
        else:
            out.append(line)
    return "\n".join(out)


class AtpDocstrings(griffe.Extension):
    def on_object(self, *, obj, loader, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
