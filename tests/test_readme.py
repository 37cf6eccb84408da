import os
import re

from pipeline.config import reference_markdown

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_config_reference_is_current():
    text = open(README).read()
    block = re.search(r"<!-- config-reference:start -->\n(.*?)<!-- config-reference:end -->", text, re.S).group(1)
    assert block.strip() == reference_markdown().strip(), "run: python -m pipeline.config, paste into README"


def test_ci_runs_the_readme_test_command():
    text = open(README).read()
    ci = open(os.path.join(os.path.dirname(README), ".ci", "run")).read()
    assert "python -m pytest -q" in text and "python -m pytest -q" in ci
    assert "pip install -e '.[dev]'" in text and "pip install --quiet -e '.[dev]'" in ci
