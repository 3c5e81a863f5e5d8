"""Console progress bars (tqdm) with the units stages report: bytes (shown as kB/MB/GB, rate per second)."""
from __future__ import annotations

import sys


def byte_progress(total_bytes: int, desc: str, enabled: bool = True):
    """A tqdm bar counting bytes (update with byte counts; shows MB and MB/s), or None if disabled.

    Writes to stderr (only when it is a terminal; logs stay clean) and clears itself when closed."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, leave=False,
                file=sys.stderr, dynamic_ncols=True, disable=None)  # None: only on a terminal
