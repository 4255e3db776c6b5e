"""benches/static_counts.py: its counts of the benches' attention launch hold together (global, and with
the benches' window of 256), and the fused kernel's main loops execute at most 1.25 times the plain flash
kernel's warp-instructions in the forward and 1.4 times in the backward, the static targets of docs/model.md,
"Kernels" (its "Static report" gives the counts of Triton 3.8 and 3.6).

The script compiles for sm_90 and counts iterations under the interpreter in a child process of its own:
it runs here as a user runs it, with the interpreter off.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


WINDOW = 256  # the benches' local case


def _static_counts(*args: str) -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "benches" / "static_counts.py"), "--json", *args],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def counts() -> dict[str, dict]:
    return _static_counts()


@pytest.fixture(scope="module")
def window_counts() -> dict[str, dict]:
    return _static_counts("--window", str(WINDOW))


def _tiles(launch: str) -> tuple[int, int]:
    rows, cols = launch.split("/")[0].split("x")
    return int(rows), int(cols)


def test_every_tile_pair_is_one_iteration_of_one_main_loop(counts):
    """T = 1500 queries and keys: each pass runs one iteration per (query tile, key tile) pair, and its
    programs call as many loop functions as it has main loops (3 for each fused pass: the far tiles inside
    the band, the NEAR tiles, the masked tiles; 2 for each plain pass)."""
    for name, c in counts.items():
        rows, cols = _tiles(c["launch"])
        assert sum(c["iterations"]) == math.ceil(1500 / rows) * math.ceil(1500 / cols), name
        loops = 3 if name in ("forward", "dq", "dkdv") else 2
        assert len(c["loops"]) == len(c["iterations"]) == loops, name


def test_the_loops_inside_the_band_take_every_whole_tile_pair(counts):
    """Global attention without padding: the forward's loops with no mask (the far tiles', then the NEAR
    tiles') take every pair of a whole key tile, as the plain kernel's does, and its masked loop the
    ragged last key tile's; the dk/dv pass's loops with no mask (its first two) take every pair of a whole
    query tile and any key tile, the NEAR tiles' and the ragged last key tile's included (a key past Tk
    reaches only its own rows of dk and dv, which are not stored)."""
    forward, dkdv = counts["forward"], counts["dkdv"]
    assert sum(forward["iterations"][:2]) == counts["plain forward"]["iterations"][0] == (1500 // 128) * 12
    assert forward["iterations"][2] == 12  # the ragged key tile's
    rows, cols = _tiles(dkdv["launch"])
    assert sum(dkdv["iterations"][:2]) == (1500 // rows) * math.ceil(1500 / cols)


def test_fused_kernel_against_the_plain_one(counts):
    total = {name: c["total"] for name, c in counts.items()}
    assert total["forward"] <= 1.25 * total["plain forward"]
    assert total["dq"] + total["dkdv"] <= 1.4 * (total["plain dq"] + total["plain dkdv"])


def _pairs_in_band(rows: int, cols: int, window: int, t: int = 1500) -> int:
    """(row tile, column tile) pairs of t x t that hold a pair with |i - j| <= window."""
    return sum(1 for r0 in range(0, t, rows) for c0 in range(0, t, cols)
               if c0 <= min(r0 + rows, t) - 1 + window and r0 <= min(c0 + cols, t) - 1 + window)


def test_a_window_runs_one_iteration_per_tile_pair_it_reaches(window_counts):
    """--window W: each fused pass runs one iteration of one main loop per tile pair the band |i - j| <= W
    reaches, and no other (the plain kernel stays global); at 128 x 128 and W = 256 the forward's every
    unmasked tile is NEAR, the rest masked."""
    for name in ("forward", "dq", "dkdv"):
        rows, cols = _tiles(window_counts[name]["launch"])
        assert sum(window_counts[name]["iterations"]) == _pairs_in_band(rows, cols, WINDOW), name
    plain = window_counts["plain forward"]
    assert sum(plain["iterations"]) == math.ceil(1500 / 128) ** 2
    forward = window_counts["forward"]
    assert (_tiles(forward["launch"]) == (128, 128) and forward["iterations"][0] == 0
            and forward["iterations"][1] > 0)
