"""The commands shown in the docs run, and the figures in them are what the commands make.

Every ``atp ...`` and ``python -c ...`` line of a fenced ``bash`` block in docs/ and the README is
run, in order per page, in a scratch folder (paths under docs/ point at the repository). A line
that cannot run here (it needs a checkpoint download, a GPU or a launcher) must be listed in
:data:`NOT_RUN` with the reason, so a new command is either run or acknowledged.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atp.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
NOT_RUN = {  # a substring of the command -> why it is not run here
    "atp eval --model llava-hf/": "downloads LLaVA-1.5-7B and runs lmms-eval on a GPU (its --dry-run form is run)",
    "atp train ...": "abbreviates the command above it (the toy run is run, and resumed in tests/test_training.py)",
    "-m atp train": "accelerate launch on 8 GPUs with LLaVA-1.5-7B",
}

pytestmark = pytest.mark.usefixtures("offline")


def commands(page: Path) -> list[str]:
    """The atp and ``python -c`` commands of a page's bash blocks (continuations joined, ``&&``
    chains split, the ``.venv/bin/`` prefix dropped)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            for part in (p.strip() for p in line.split("&&")):
                part = re.sub(r"^\.venv/bin/", "", part)
                if re.match(r"(atp |python -c |accelerate launch .*-m atp )", part):
                    found.append(part)
    return found


def run(command: str, folder: Path) -> None:
    argv = shlex.split(command, comments=True)
    argv = [str(ROOT / arg) if arg.startswith("docs/") else arg for arg in argv]
    if argv[0] == "python":
        done = subprocess.run(
            [sys.executable, *argv[1:]], cwd=folder, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, (command, done.stderr[-2000:])
        return
    assert main(argv[1:]) == 0, command


def test_pages_show_commands():
    assert sum(len(commands(page)) for page in PAGES) >= 15


@pytest.mark.parametrize("page", [p for p in PAGES if commands(p)], ids=lambda p: p.name)
def test_every_command_on_the_page_runs(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ran = 0
    for command in commands(page):
        reasons = [why for part, why in NOT_RUN.items() if part in command]
        if reasons:
            continue
        assert "..." not in command, f"{command!r} abbreviates a command: list it in NOT_RUN with the reason"
        assert "llava-hf/" not in command or "--dry-run" in command, f"{command!r} downloads weights"
        run(command, tmp_path)
        ran += 1
    capsys.readouterr()
    assert ran > 0


def test_not_run_entries_are_still_on_the_pages():
    shown = [command for page in PAGES for command in commands(page)]
    for part in NOT_RUN:
        assert any(part in command for command in shown), f"NOT_RUN entry {part!r} matches no command"


def test_the_front_page_picture_is_what_atp_visualize_draws(tmp_path, capsys):
    """Same size, and the same pixels in every drawn grid (the titles' font may differ by Pillow)."""
    import json

    assert main(["visualize", "--output", str(tmp_path / "now.png"), "--json"]) == 0
    layout = json.loads(capsys.readouterr().out)["layout"]
    shown = np.asarray(Image.open(ROOT / "docs/images/visualize.png").convert("RGB"))
    now = np.asarray(Image.open(tmp_path / "now.png").convert("RGB"))
    stale = "docs/images/visualize.png is out of date: atp visualize --output docs/images/visualize.png"
    assert shown.shape == now.shape, stale
    for panel in layout["panels"]:
        for picture in panel["pictures"]:
            left, top, right, bottom = picture["box"]
            assert np.array_equal(shown[top:bottom, left:right], now[top:bottom, left:right]), stale


def test_the_evaluation_table_and_plot_come_from_the_recorded_run(tmp_path, capsys):
    """docs/evaluation.md's tiny table is the markdown of docs/images/eval-tiny.json, which also
    draws docs/images/eval-tiny.png."""
    record = ROOT / "docs/images/eval-tiny.json"
    assert main(["eval", "--from-table", str(record), "--plot", str(tmp_path / "plot.png")]) == 0
    table = capsys.readouterr().out.strip()
    assert table in (ROOT / "docs/evaluation.md").read_text()
    assert Image.open(tmp_path / "plot.png").size == Image.open(ROOT / "docs/images/eval-tiny.png").size


def test_every_page_is_in_the_site_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").rglob("*.md"):
        assert str(page.relative_to(ROOT / "docs")) in nav, f"{page} is not in mkdocs.yml's nav"


def test_the_study_page_shows_the_recorded_run():
    """docs/study.md's tables are the report of docs/images/study.json."""
    import json

    from atp.study.report import markdown

    record = json.loads((ROOT / "docs/images/study.json").read_text())
    page = (ROOT / "docs/study.md").read_text()
    tables = markdown(record).split("\n\n")
    for table in (t for t in tables if t.startswith("|")):
        assert table.strip() in page


def test_every_supported_family_is_in_the_readme_and_the_backbones_page():
    from atp.plugins import registry

    readme, page = (ROOT / "README.md").read_text(), (ROOT / "docs/backbones.md").read_text()
    for name in registry().names("backbone"):
        assert f"`{name}`" in readme and f"`{name}`" in page, f"backbone {name!r} is not documented"


def test_the_benchmarks_page_shows_the_recorded_runs():
    """docs/benchmarks.md's measured tables are the reports of the JSON records beside them."""
    import json

    from atp.cli import bench, scaling

    page = (ROOT / "docs/benchmarks.md").read_text()
    images = ROOT / "docs/images"
    record = json.loads((images / "bench.json").read_text())
    tables = bench.markdown(record).split("\n\n")
    assert len(tables) == 4  # methods, targets, ops, atp's share: the run was profiled
    widths = [json.loads((images / f"bench-{w}.json").read_text()) for w in (512, 2048)]
    tables += [
        bench.width_markdown([widths[0], record, widths[1]]),
        scaling.markdown(json.loads((images / "scaling.json").read_text())),
    ]
    for table in tables:
        assert table.strip() in page, table.splitlines()[0]
