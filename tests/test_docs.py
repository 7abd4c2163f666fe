"""The documentation: the site builds with `mkdocs build --strict` (no broken link or anchor, no page
left out of the nav), the options tables in README.md and docs/options.md are the ones
scripts/gen_options.py makes from the current Settings, and README.md's links land."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from quantserve.server.config import Settings

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def _gen_options():
    spec = importlib.util.spec_from_file_location("gen_options", REPO / "scripts" / "gen_options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    # NO_MKDOCS_2_WARNING: mkdocs-material prints a banner about MkDocs 2.0 on every build.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(REPO / "mkdocs.yml"), "--site-dir", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_site_builds_strict(site):
    assert (site / "index.html").exists() and (site / "benchmarks" / "index.html").exists()


@pytest.mark.parametrize("path", ["README.md", "docs/options.md"])
def test_options_table_is_current(path):
    gen = _gen_options()
    text = (REPO / path).read_text()
    assert gen.render(text, gen.table()) == text, f"{path}: run .venv/bin/python scripts/gen_options.py"


def test_options_table_has_one_row_per_setting():
    rows = [line for line in _gen_options().table().splitlines()[2:]]
    assert len(rows) == len(Settings.model_fields)
    for row, name in zip(rows, Settings.model_fields):
        assert f"`QUANTSERVE_{name.upper()}`" in row
        assert name == "models" or f"`--{name.replace('_', '-')}`" in row


def test_gen_options_check_fails_on_a_stale_table():
    gen = _gen_options()
    stale = f"intro\n{gen.BEGIN}\n| old | table |\n{gen.END}\noutro\n"
    fresh = gen.render(stale, gen.table())
    assert fresh != stale and fresh.startswith("intro\n") and fresh.endswith("\noutro\n")
    assert gen.render(fresh, gen.table()) == fresh
    with pytest.raises(ValueError, match="markers"):
        gen.render("no markers here", gen.table())


def test_readme_links_land(site):
    """Every relative link in README.md names a file of the repository, and an anchor into a docs
    page names a heading of the built page."""
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    relative = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert relative, "README.md links into docs/"
    for link in relative:
        target, _, anchor = link.partition("#")
        assert (REPO / target).exists(), f"README.md links to {target}, which does not exist"
        if anchor:
            page = Path(target).relative_to("docs").with_suffix("")
            html = (site / page / "index.html").read_text()
            assert f'id="{anchor}"' in html, f"README.md links to {link}: no such anchor"


def test_readme_is_a_users_document():
    text = README.read_text()
    assert len(text.splitlines()) <= 400
    # What is, not how it came to be: no issue numbers, no commands that live outside the repository.
    assert not re.search(r"(?<![\w/&])#\d+\b", text)
    assert "/tmp/" not in text
