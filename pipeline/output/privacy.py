"""Moved to pipeline/privacy/pseudonyms.py; re-exported for output/__init__.py and ray/runner.py alone until they
import from there (issue 27): then delete this file."""

from pipeline.privacy.pseudonyms import (PseudonymMap, Pseudonymizer, RowPseudonymizer,  # noqa: F401
                                         load_pseudonymizer, pseudonymized_columns)
