"""What a compiled kernel's main loops execute, read from its SASS (the GPU's own instructions).

`python -m echo_kernels.aot` uses it: each cubin is disassembled with the nvdisasm that Triton
ships, loops are found as backward branches, and the loops holding tensor-core instructions (the key
loops of attention, the token loops of rotary) are counted: all instructions, tensor-core ones,
synchronous global loads (LDG, which stall the warp until the data lands) against asynchronous copies
(LDGSTS = cp.async, UTMALDG = TMA, which the compiler pipelines), and the special-function unit
(MUFU: exp2, sin, cos). No GPU is needed: this is what the hardware would run, not how fast.
`python -m echo_kernels.aot --sass NAME` prints one launch's SASS with those loops marked.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

# `/*1100*/   @!P1 BRA `(.L_x_2) ;` -> address, optional predicate, opcode, operands
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?);")
_LABEL = re.compile(r"^(\.L_\w+):")
_BRANCH_TARGET = re.compile(r"`\((\.L_\w+)\)")

TENSOR_CORE = ("HMMA", "HGMMA", "IMMA", "QGMMA")
ASYNC_LOADS = ("LDGSTS", "UTMALDG", "UBLKCP")


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with its modifiers, e.g. "LDG.E.U16", "MUFU.EX2"
    operands: str


@dataclass(frozen=True)
class LoopCounts:
    """Static counts over one loop body (each instruction once, as written, not as executed)."""

    instructions: int  # all but NOPs
    tensor_core: int  # HMMA (sm_80) / HGMMA (sm_90 warpgroup) instructions
    sync_loads: int  # LDG: global loads the warp waits on
    async_loads: int  # LDGSTS (cp.async) and TMA copies into shared memory
    exp2: int
    sin_cos: int

    @property
    def per_tensor_core(self) -> float:
        """Instructions per tensor-core instruction: the overhead a loop pays around its products."""
        return self.instructions / self.tensor_core if self.tensor_core else float("inf")


def parse(sass: str) -> tuple[list[Instruction], dict[str, int]]:
    """nvdisasm's text -> (instructions in address order, {label: address of the next instruction})."""
    instructions, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        found = _INSTRUCTION.match(line)
        if found:
            address = int(found.group(1), 16)
            labels.update((name, address) for name in pending)
            pending = []
            instructions.append(Instruction(address, found.group(2), found.group(3)))
    return instructions, labels


def loops(instructions: list[Instruction], labels: dict[str, int]) -> list[tuple[int, int]]:
    """(first, last) addresses of every loop: a branch back to a label at or before it."""
    found = set()
    for ins in instructions:
        if ins.opcode.split(".")[0] in ("BRA", "JMP"):
            target = _BRANCH_TARGET.search(ins.operands)
            if target and labels.get(target.group(1), ins.address + 1) <= ins.address:
                found.add((labels[target.group(1)], ins.address))
    return sorted(found)


def count(instructions: list[Instruction]) -> LoopCounts:
    base = [ins.opcode.split(".")[0] for ins in instructions]
    return LoopCounts(
        instructions=sum(op != "NOP" for op in base),
        tensor_core=sum(op in TENSOR_CORE for op in base),
        sync_loads=sum(op == "LDG" for op in base),
        async_loads=sum(op in ASYNC_LOADS for op in base),
        exp2=sum(ins.opcode.startswith("MUFU.EX2") for ins in instructions),
        sin_cos=sum(ins.opcode.startswith(("MUFU.SIN", "MUFU.COS")) for ins in instructions),
    )


def main_loop_spans(instructions: list[Instruction], labels: dict[str, int]) -> list[tuple[int, int]]:
    """(first, last) addresses of each innermost loop that holds tensor-core instructions, in address
    order: a loop around such loops (a program's loop over its tiles, each with its own loops over the
    other operand) is not one, its inner loops are; a loop without tensor-core instructions nested in
    one is part of it."""
    spans = [(a, b) for a, b in loops(instructions, labels)
             if any(op.opcode.split(".")[0] in TENSOR_CORE for op in instructions if a <= op.address <= b)]
    return [(a, b) for a, b in spans if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans)]


def _spans_and_counts(sass: str) -> tuple[list[tuple[int, int]], list[LoopCounts]]:
    """main_loop_spans of a listing, and the counts of each span."""
    instructions, labels = parse(sass)
    spans = main_loop_spans(instructions, labels)
    return spans, [count([ins for ins in instructions if a <= ins.address <= b]) for a, b in spans]


def code_size(sass: str) -> int:
    """The instructions of a listing, every one a program may fetch (16 bytes each from sm_70 on)."""
    return len(parse(sass)[0])


def main_loops(sass: str) -> list[LoopCounts]:
    """Counts of each main loop (main_loop_spans), in address order."""
    return _spans_and_counts(sass)[1]


def mark_main_loops(sass: str) -> str:
    """The SASS text with a comment line before and after each main loop, the opening one with its
    counts, numbered as the report numbers them: what to read when a loop's counts look wrong."""
    spans, counts = _spans_and_counts(sass)
    starts = {a: i for i, (a, _) in enumerate(spans)}
    ends = {b: i for i, (_, b) in enumerate(spans)}
    lines = []
    for line in sass.splitlines():
        found = _INSTRUCTION.match(line)
        address = int(found.group(1), 16) if found else None
        if address in starts:
            lines.append(f"        // ---- main loop {starts[address]}: {counts[starts[address]]}")
        lines.append(line)
        if address in ends:
            lines.append(f"        // ---- end of main loop {ends[address]}")
    return "\n".join(lines)


def disassemble(cubin: bytes) -> str:
    """The SASS of a cubin, by the nvdisasm that Triton ships beside its ptxas."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool, "-c", path], capture_output=True, text=True, check=True).stdout


# Per-SM limits of the CUDA occupancy rules (CUDA C Programming Guide, compute capabilities table).
_REGISTERS_PER_SM = 65536
_THREADS_PER_SM = 2048
_CTAS_PER_SM = 32
_SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
_SHARED_RESERVED_PER_CTA = 1024


def ctas_per_sm(arch: int, registers: int, shared_bytes: int, num_warps: int) -> int:
    """How many CTAs of this kernel fit on one SM at once: the tightest of the register file
    (allocated per warp in units of 256), shared memory, threads and the CTA cap."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = _REGISTERS_PER_SM // (per_warp * num_warps) if registers > 0 else _CTAS_PER_SM
    by_shared = _SHARED_PER_SM[arch] // (shared_bytes + _SHARED_RESERVED_PER_CTA)
    by_threads = _THREADS_PER_SM // (32 * num_warps)
    return min(by_registers, by_shared, by_threads, _CTAS_PER_SM)
