"""``handgrad verify``: check a run, a checkpoint, an export or prepared data against the
sizes and hashes recorded when they were written (``cli.py``)."""
