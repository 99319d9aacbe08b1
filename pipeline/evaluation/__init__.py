"""Local validation of a pipeline against a site's own truth: metrics, masks on the series grid, the report.

Pure computation (no clock, no I/O beyond reading the truth files the caller names); the
``pacs-triage evaluate`` command (``daemon/cli/evaluate.py``) runs the cases and writes the report.
"""
