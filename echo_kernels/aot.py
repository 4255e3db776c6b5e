"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90, on a machine without a GPU.

The Triton interpreter accepts code that the GPU compiler rejects, so each kernel module lists the
launches it makes (`aot_specs()`: signature, constexprs, warps, stages) and this module compiles them
for real GPU targets and reads back what matters for speed: shared memory, registers, spilled
(local) bytes, and whether `tl.dot` became tensor-core instructions (mma on sm_80, wgmma on sm_90).

    python -m echo_kernels.aot            # table for every kernel, both targets
    python -m echo_kernels.aot --json f   # the same as JSON

Kernels defined under TRITON_INTERPRET=1 are interpreter objects, so `reports()` compiles in a
child process with the interpreter off.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

# Modules whose `aot_specs()` list their kernels' launches.
KERNEL_MODULES: tuple[str, ...] = ("echo_kernels.kernels.rotary", "echo_kernels.kernels.attention")
TARGETS = (80, 90)


@dataclass
class KernelSpec:
    """One launch configuration of a Triton kernel, as `triton.compile` needs it."""

    name: str
    fn: object  # triton JITFunction
    signature: dict[str, str]  # argument -> "*fp32", "i32", ..., "constexpr"
    constexprs: dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    # integer arguments known to be multiples of 16 at real launches (strides of dense tensors);
    # pointers always are (torch allocates 16-byte aligned), and the JIT specialises on both.
    aligned: tuple[str, ...] = ()


@dataclass
class CompileReport:
    name: str
    arch: int
    shared_bytes: int
    registers: int
    spilled_bytes: int  # ptxas's spill stores: registers that did not fit
    stack_bytes: int  # the stack frame (spills, and local arrays such as sin/cos's slow path)
    mma: bool  # tensor-core instructions of any generation
    wgmma: bool  # Hopper warpgroup MMA


def _triton_bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def _ptxas_usage(ptx: str) -> tuple[int, int, int]:
    """(registers, spill-store bytes, stack bytes) as `ptxas -v` reports them for this PTX, run with
    the flags Triton's own build uses (its bundled ptxas; its register-allocation workaround)."""
    target = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE).group(1)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        base = [_triton_bin("ptxas"), "-lineinfo", "-v", f"--gpu-name={target}", path, "-o", path + ".o"]
        run = subprocess.run([*base[:3], "--regAllocOptLevel=2", *base[3:]], capture_output=True, text=True)
        if run.returncode != 0:  # an older ptxas without that option
            run = subprocess.run(base, capture_output=True, text=True, check=True)
    log = run.stderr + run.stdout
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return (int(registers.group(1)) if registers else -1, int(spills.group(1)) if spills else -1,
            int(stack.group(1)) if stack else -1)


def _compile(spec: KernelSpec, arch: int):
    """triton.compile of one launch for compute capability `arch`, as a real launch would build it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    # Under the interpreter the kernel is an interpreter object; its Python function compiles as is.
    fn = spec.fn if isinstance(spec.fn, JITFunction) else JITFunction(spec.fn.fn)
    divisible = [["tt.divisibility", 16]]
    attrs = {
        (fn.arg_names.index(name),): divisible
        for name, kind in spec.signature.items()
        if kind.startswith("*") or name in spec.aligned
    }
    source = ASTSource(fn=fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _report(spec: KernelSpec, arch: int, compiled, usage: tuple[int, int, int]) -> CompileReport:
    ptx = compiled.asm["ptx"]
    registers, spilled, stack = usage
    return CompileReport(
        name=spec.name,
        arch=arch,
        shared_bytes=compiled.metadata.shared,
        registers=registers,
        spilled_bytes=spilled,
        stack_bytes=stack,
        mma=bool(re.search(r"\b(mma|wgmma)\.", ptx)),
        wgmma="wgmma." in ptx,
    )


def compile_spec(spec: KernelSpec, arch: int) -> CompileReport:
    """Compile one launch for compute capability `arch` (80, 90) and report on it."""
    compiled = _compile(spec, arch)
    return _report(spec, arch, compiled, _ptxas_usage(compiled.asm["ptx"]))


def all_specs() -> list[KernelSpec]:
    specs = []
    for module in KERNEL_MODULES:
        specs.extend(importlib.import_module(module).aot_specs())
    return specs


def _compile_all(arches) -> list[CompileReport]:
    jobs = [(spec, arch) for spec in all_specs() for arch in arches]
    compiled = [_compile(spec, arch) for spec, arch in jobs]
    # ptxas runs as a child process per kernel: in parallel, one per core.
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        usages = list(pool.map(_ptxas_usage, [c.asm["ptx"] for c in compiled]))
    return [_report(spec, arch, c, usage) for (spec, arch), c, usage in zip(jobs, compiled, usages)]


def reports(arches=TARGETS) -> list[CompileReport]:
    """Compile every kernel for every target, in a child process when the interpreter is on."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return _compile_all(arches)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "echo_kernels.aot", "--json", f.name, "--arch", *map(str, arches)]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if run.returncode != 0:  # the compiler's own message, not just an exit status
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr[-4000:]}")
        return [CompileReport(**row) for row in json.load(open(f.name))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(TARGETS))
    parser.add_argument("--json", help="write the reports to this file as JSON")
    args = parser.parse_args()
    rows = reports(args.arch)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
        return
    import triton

    print(f"Triton {triton.__version__}; spill = ptxas spill stores, stack = stack frame (bytes)\n")
    print(f"{'kernel':40} {'sm':>3} {'shared':>8} {'regs':>5} {'spill':>6} {'stack':>6} {'mma':>4} {'wgmma':>6}")
    for r in rows:
        print(f"{r.name:40} {r.arch:>3} {r.shared_bytes:>8} {r.registers:>5} {r.spilled_bytes:>6} "
              f"{r.stack_bytes:>6} {'yes' if r.mma else 'no':>4} {'yes' if r.wgmma else 'no':>6}")


if __name__ == "__main__":
    main()
