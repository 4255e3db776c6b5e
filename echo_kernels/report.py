"""Render benchmark results (the JSON that `pytest benches/` writes) as a markdown table and a plot.

    python -m echo_kernels.report results.json                 # the table, on stdout
    python -m echo_kernels.report results.json --plot out.png  # and the speed-up plot
    python -m echo_kernels.report results.json --markdown out.md

In every group the case with role "ours" is compared with each "peer" of the same group, timed in
the same run: speed-up = peer median / our median.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from .optional import MissingExtra, require


def _duration(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _percent(value) -> str:
    return f"{100 * value:.0f}%" if value is not None else ""


def groups(results: dict) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for case in results["cases"]:
        out[case["group"]].append(case)
    return dict(out)


def speedups(results: dict) -> list[tuple[str, str, float]]:
    """(group, peer case, peer median / ours median) for every peer of a group that has ours."""
    rows = []
    for group, cases in groups(results).items():
        ours = [c for c in cases if c.get("role") == "ours"]
        if not ours:
            continue
        for peer in cases:
            if peer.get("role") == "peer":
                rows.append((group, peer["case"], peer["median_s"] / ours[0]["median_s"]))
    return rows


def markdown_table(results: dict) -> str:
    """One row per case. Absolute medians only from a GPU run; CPU runs show ratios and fractions."""
    limits = results["ceilings"]
    absolute = results.get("gpu", False)
    lines = [
        f"Device: {results['device']} ({results['date']}, torch {results['torch']}); measured ceilings: "
        f"copy {limits['copy_bandwidth'] / 1e9:.0f} GB/s, {limits['matmul_dtype']} matmul "
        f"{limits['matmul_flops'] / 1e12:.1f} TFLOP/s.",
        "",
        (f"| group | case |{' median |' if absolute else ''} ours vs this | of copy bandwidth | "
         f"of matmul rate |"),
        f"|---|---|{'---|' if absolute else ''}---|---|---|",
    ]
    for group, cases in groups(results).items():
        ours = next((c for c in cases if c.get("role") == "ours"), None)
        for case in cases:
            vs = ""
            if ours is not None and case is not ours and case.get("role") == "peer":
                vs = f"{case['median_s'] / ours['median_s']:.2f}x"
            name = f"**{case['case']}**" if case is ours else case["case"]
            median = f" {_duration(case['median_s'])} |" if absolute else ""
            lines.append(
                f"| {group} | {name} |{median} {vs} | "
                f"{_percent(case.get('bandwidth_fraction'))} | {_percent(case.get('flops_fraction'))} |"
            )
    return "\n".join(lines)


def _kernel_name(name: str) -> str:
    """A device kernel's name without its return type, template and parameters."""
    name = name.removeprefix("void ")
    cut = min((i for i in (name.find("<"), name.find("(")) if i > 0), default=len(name))
    return name[:cut]


def breakdown_table(results: dict) -> str:
    """Where the time of the cases that measured it (a "breakdown", benches/breakdown.py) goes, per call:
    on a GPU, the host's time issuing the call, the kernels' summed time, the span from the first
    kernel's start to the last one's end, and the largest kernels; everywhere, the largest host ops'
    shares of the time in the ops the profiler records (absolute times only from a GPU). "" when no case
    has one."""
    cases = [c for c in results["cases"] if c.get("breakdown")]
    if not cases:
        return ""
    gpu = results.get("gpu", False)
    head = "| group | case |" + (" median | host | kernels | span | largest kernels (time x launches) |"
                                 if gpu else "")
    lines = [head + " largest host ops (share of the time in ops) |",
             "|---|---|" + "---|" * (6 if gpu else 1)]
    for case in cases:
        b = case["breakdown"]
        row = f"| {case['group']} | {case['case']} |"
        if gpu:
            kernels = ", ".join(f"{_kernel_name(name)} {_duration(seconds)} x{count:g}"
                                for name, (seconds, count) in b["kernels"].items())
            row += (f" {_duration(case['median_s'])} | {_duration(b['host_s'])} | "
                    f"{_duration(b['device_s'])} | {_duration(b['span_s'])} | {kernels} |")
        ops = ", ".join(f"{name} {_percent(seconds / b['ops_s'])}" for name, seconds in b["ops"].items())
        lines.append(f"{row} {ops} |")
    return "\n".join(["## Where the time goes", "", *lines])


def plot(results: dict, path: str) -> None:
    """Horizontal bars: our speed-up over each peer, per group, on a log scale (1x marked)."""
    matplotlib = require("matplotlib", "the report's plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = speedups(results)
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.5))
    labels = [f"{group}: vs {peer}" for group, peer, _ in rows]
    values = [value for _, _, value in rows]
    ax.barh(range(len(rows)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speed-up of echo-kernels (peer time / our time)")
    ax.set_title(f"{results['device']}, {results['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description="Render echo-kernels benchmark results.")
    parser.add_argument("results", help="JSON written by `pytest benches/`")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--plot", help="write the speed-up plot to this PNG file")
    args = parser.parse_args()
    with open(args.results) as f:
        results = json.load(f)
    table = "\n\n".join(part for part in (markdown_table(results), breakdown_table(results)) if part)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    try:
        main()
    except MissingExtra as error:
        raise SystemExit(f"python -m echo_kernels.report: {error}") from None
