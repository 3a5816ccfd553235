"""Moved to pipeline/privacy/safe_errors.py; re-exported for io/read.py alone until it imports from there (issue
27): then delete this file."""

from pipeline.privacy.safe_errors import class_name, exception_text, safe_facts  # noqa: F401
