"""The review loop on the tables the pipeline writes: sibling tables beside an output (`tables.py`), near-duplicate
groups (`dedup.py`), exports for reviewers (`export.py`: `selection`, `documents`, `label_studio`) and their answers
brought back as ground truth."""
