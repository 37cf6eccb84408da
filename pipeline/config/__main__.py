"""python -m pipeline.config: print the configuration reference table of docs/configuration.md."""

from pipeline.config.args import reference_markdown

print(reference_markdown())
