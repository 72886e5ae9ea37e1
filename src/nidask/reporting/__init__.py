"""Outputs people read: motion tables, figures and the QC page."""
