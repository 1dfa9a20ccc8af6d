"""The documentation: the configuration reference is the config dataclasses' own, the site builds strictly
(no broken link, reference or docstring), and the README stays a front door."""

import os
import subprocess
import sys
from pathlib import Path

from patchgd.config import reference

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_reference_is_generated_from_the_dataclasses():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == reference(), "docs/configuration.md is stale: python -m patchgd.config > docs/configuration.md"
    # every key of the schema is on the page, with its meaning
    assert "| `patchgd.grad_accum_steps` | `null` | int or null, >= 1 | `ε`: inner iterations per update" in page


def test_the_site_builds_in_strict_mode(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("fill_z") > 0


def test_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    # It opens with the two commands, and CI runs exactly the second.
    first = [line.split("#")[0].strip() for line in readme.splitlines()[:6] if line.startswith("pip install")]
    assert first == ["pip install . && patchgd demo", "pip install -e '.[test]' && pytest -q"]
    assert first[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_no_page_repeats_a_word():
    """A doubled word ("and and" across a line break, as docs/cli.md had) is a slip a reader trips over."""
    import re

    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        doubled = re.findall(r"\b(and|the|a|of|to|is|in|on|for)\s+\1\b", page.read_text(), flags=re.I)
        assert not doubled, f"{page.name}: {doubled}"
