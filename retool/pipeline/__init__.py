"""`retool run`: one pipeline file for CI and MLOps."""
from retool.pipeline.runner import RunResult, run  # noqa: F401
