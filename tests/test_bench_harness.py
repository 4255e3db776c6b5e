"""The bench harness (benches/harness.py): ways timed in alternating rounds, one row per way in the
results."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
import harness  # noqa: E402


def test_alternating_rounds_put_every_ways_round_before_the_next_round():
    params = harness.alternating_rounds(("a", pytest.param("b", marks=pytest.mark.speech)), 3)
    assert [p.values for p in params] == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    assert [p.id for p in params][:4] == ["a-round0", "b-round0", "b-round1", "a-round1"]
    assert all([m.name for m in p.marks] == (["speech"] if p.values[0] == "b" else []) for p in params)


def test_alternating_rounds_give_every_way_every_place_in_a_round():
    ways, rounds = ("a", "b", "c"), 6
    params = harness.alternating_rounds(ways, rounds)
    places = {way: [] for way in ways}
    for r in range(rounds):
        for place, p in enumerate(params[r * len(ways):(r + 1) * len(ways)]):
            assert p.values[1] == r
            places[p.values[0]].append(place)
    assert all(sorted(p) == [0, 0, 1, 1, 2, 2] for p in places.values())


def test_rounds_of_a_way_merge_into_one_row_with_the_median_of_all_its_times(monkeypatch):
    monkeypatch.setattr(harness, "_ceilings",
                        {"copy_bandwidth": 1e9, "matmul_flops": 1e12, "matmul_dtype": "float32"})
    rows = [
        {"group": "g", "case": "ours", "median_s": 3.0, "times_s": [3.0], "role": "ours", "flops": 2e12},
        {"group": "g", "case": "peer", "median_s": 5.0, "times_s": [5.0], "role": "peer"},
        {"group": "g", "case": "ours", "median_s": 1.0, "times_s": [1.0], "role": "ours", "flops": 2e12},
        {"group": "g", "case": "peer", "median_s": 4.0, "times_s": [4.0, 9.0], "role": "peer"},
        {"group": "h", "case": "ours", "median_s": 7.0, "role": "ours"},  # a results file's row without times
    ]
    merged = [harness._with_fractions(row) for row in harness._rounds_merged(rows)]
    assert [(row["group"], row["case"], row["median_s"]) for row in merged] == [
        ("g", "ours", 2.0), ("g", "peer", 5.0), ("h", "ours", 7.0)]
    assert merged[0]["times_s"] == [3.0, 1.0] and merged[1]["times_s"] == [5.0, 4.0, 9.0]
    assert merged[0]["flops_fraction"] == pytest.approx(2e12 / 2.0 / 1e12)
    assert merged[0]["tflops"] == pytest.approx(2e12 / 2.0 / 1e12)  # from the merged median, not a round's
    assert "tflops" not in merged[1]  # no flops given
    assert rows[0]["times_s"] == [3.0] and "times_s" not in rows[4]  # the rows given are left as they were


def test_the_sdpa_peer_runs_in_the_dtype_it_is_given():
    """RoPE by the reference rotates in float32; the peers' q and k go back to q's dtype, which SDPA and
    FlexAttention need v to share (benches/bench_attention.py)."""
    import bench_attention

    x, _ = bench_attention.make_inputs(1, 2, 24, 32, requires_grad=False, with_m=False)
    x.update({name: x[name].to(torch.bfloat16).requires_grad_() for name in ("q", "k", "v")})
    assert [t.dtype for t in bench_attention._rotate(x)] == [torch.bfloat16] * 2
    out = bench_attention.run_sdpa(x, 4)
    assert out.dtype == torch.bfloat16
    dq, dk, dv = torch.autograd.grad(out.float().square().sum(), [x["q"], x["k"], x["v"]])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in (dq, dk, dv))
