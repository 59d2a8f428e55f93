"""Versioned SQL migrations, shipped as package data (``[options.package_data] * = *.sql``).

Files are named ``NNNN_description.sql`` and applied in order by ``python -m intelligence migrate``
(see ``intelligence/schema.py``). Each file runs in its own transaction; never edit one that has
been applied anywhere: add a new file instead (the runner refuses a changed checksum).

This directory is a package only so that an installed (non-editable) copy still finds the files
through ``importlib.resources``; it has no code.
"""
