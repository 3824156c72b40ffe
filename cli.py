#!/usr/bin/env python
"""Thin entry point: ``python cli.py ...`` is the same as ``erf ...``."""
from erf.cli import main_entry

if __name__ == "__main__":
    main_entry()
