import os
import re

from pipeline.config import reference_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
CONFIG_DOC = os.path.join(ROOT, "docs", "configuration.md")


def test_config_reference_is_current():
    text = open(CONFIG_DOC).read()
    block = re.search(r"<!-- config-reference:start -->\n(.*?)<!-- config-reference:end -->", text, re.S).group(1)
    assert block.strip() == reference_markdown().strip(), "python -m pipeline.config, into docs/configuration.md"


def test_readme_is_a_first_hour_read_and_links_resolve():
    text = open(README).read()
    assert len(text) <= 12_000
    docs = os.path.join(ROOT, "docs")
    for doc in [README, *(os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md"))]:
        body = open(doc).read()
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", body):
            if "://" not in target:
                assert os.path.exists(os.path.join(os.path.dirname(doc), target)), f"{doc}: broken link {target}"


def test_ci_runs_the_readme_test_command():
    text = open(README).read()
    ci = open(os.path.join(os.path.dirname(README), ".ci", "run")).read()
    assert "python -m pytest -q" in text and "python -m pytest -q" in ci
    assert "pip install -e '.[dev]'" in text and "pip install --quiet -e '.[dev]'" in ci
