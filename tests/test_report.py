"""echo_kernels.report renders a results JSON: speed-ups of ours over each peer of the same group."""

import json

import pytest

from echo_kernels import report

RESULTS = {
    "device": "Test GPU", "gpu": True, "date": "2026-01-01", "torch": "2.x",
    "ceilings": {"copy_bandwidth": 3e12, "matmul_flops": 8e14, "matmul_dtype": "bfloat16"},
    "cases": [
        {"group": "g1", "case": "kernel", "median_s": 2e-3, "role": "ours", "bytes": 3e9,
         "bandwidth_fraction": 0.5},
        {"group": "g1", "case": "compiled", "median_s": 5e-3, "role": "peer"},
        {"group": "g1", "case": "reference", "median_s": 3e-2, "role": "peer"},
        {"group": "g2", "case": "reference", "median_s": 1.5, "role": "peer"},
    ],
}


def test_speedups_are_peer_over_ours_within_a_group():
    assert report.speedups(RESULTS) == [("g1", "compiled", pytest.approx(2.5)),
                                        ("g1", "reference", pytest.approx(15.0))]


def test_markdown_table_names_device_ceilings_and_ratios():
    table = report.markdown_table(RESULTS)
    assert "Test GPU" in table and "copy 3000 GB/s" in table and "800.0 TFLOP/s" in table
    assert "| g1 | **kernel** | 2 ms |  | 50% |  |" in table
    assert "| g1 | compiled | 5 ms | 2.50x |" in table
    assert "| g2 | reference | 1.5 s |  |" in table


def test_cpu_tables_show_ratios_not_times():
    table = report.markdown_table({**RESULTS, "device": "x86_64 CPU", "gpu": False})
    assert "median" not in table and " ms " not in table
    assert "| g1 | compiled | 2.50x |" in table and "| g1 | **kernel** |  | 50% |  |" in table


def test_cli_writes_table_and_plot(tmp_path, monkeypatch):
    source = tmp_path / "results.json"
    source.write_text(json.dumps(RESULTS))
    monkeypatch.setattr("sys.argv", ["report", str(source), "--markdown", str(tmp_path / "t.md"),
                                     "--plot", str(tmp_path / "p.png")])
    report.main()
    assert (tmp_path / "t.md").read_text().startswith("Device: Test GPU")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


BREAKDOWN = {
    "host_s": 4e-4, "ops_s": 2e-4, "ops": {"cuLaunchKernel": 1.5e-4, "aten::empty": 5e-5},
    "device_s": 1.2e-3, "span_s": 1.5e-3,
    "kernels": {"_attn_fwd_kernel": [1e-3, 1.0],
                "void at::native::vectorized_elementwise_kernel<4, "
                "at::native::FillFunctor<float> >(int, float)":
                    [2e-4, 2.0]},
}
WITH_BREAKDOWN = {**RESULTS, "cases": [*RESULTS["cases"],
                                       {"group": "g3", "case": "kernel", "median_s": 1.6e-3, "role": "ours",
                                        "breakdown": BREAKDOWN}]}


def test_breakdown_table_splits_a_gpu_call_into_host_and_kernels():
    table = report.breakdown_table(WITH_BREAKDOWN)
    assert table.startswith("## Where the time goes") and table.count("\n| g3 |") == 1
    assert ("| g3 | kernel | 1.6 ms | 400 us | 1.2 ms | 1.5 ms | _attn_fwd_kernel 1 ms x1, "
            "at::native::vectorized_elementwise_kernel 200 us x2 | cuLaunchKernel 75%, "
            "aten::empty 25% |") in table


def test_breakdown_table_of_a_cpu_run_gives_shares_not_times():
    table = report.breakdown_table({**WITH_BREAKDOWN, "gpu": False})
    assert "| g3 | kernel | cuLaunchKernel 75%, aten::empty 25% |" in table
    assert " ms" not in table and " us" not in table


def test_no_breakdown_no_section(tmp_path, monkeypatch):
    assert report.breakdown_table(RESULTS) == ""
    source = tmp_path / "results.json"
    for results, sections in ((RESULTS, 0), (WITH_BREAKDOWN, 1)):
        source.write_text(json.dumps(results))
        monkeypatch.setattr("sys.argv", ["report", str(source), "--markdown", str(tmp_path / "t.md")])
        report.main()
        assert (tmp_path / "t.md").read_text().count("## Where the time goes") == sections
