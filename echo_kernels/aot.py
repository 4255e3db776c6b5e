"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90, on a machine without a GPU.

The Triton interpreter accepts code that the GPU compiler rejects, so each kernel module lists the
launches it makes on each target (`aot_specs(arch)`: signature, constexprs, warps, stages, from the
target's tile table) and this module compiles them for it, each specialised as triton's JIT
specialises that launch at Echo's real shapes (unit strides as constexpr 1, integers and pointers
divisible by 16 marked so), and reads back what matters for speed: shared memory, registers, spilled
(local) bytes, CTAs per SM, whether `tl.dot` became tensor-core instructions (mma on sm_80, wgmma on
sm_90), the size of its code, and what each main loop executes (echo_kernels.sass: instructions,
tensor-core ones, synchronous vs asynchronous global loads, exp2 and sin/cos on the special-function
unit).

    python -m echo_kernels.aot            # the two tables for every kernel, both targets
    python -m echo_kernels.aot --json f   # the same as JSON
    python -m echo_kernels.aot --sass attention_fwd_h64_bf16 --arch 90   # one launch's SASS, loops marked

The compile runs in a process of its own, with the interpreter off: kernels defined under
TRITON_INTERPRET=1 are interpreter objects, which do not compile, and finding the launches swaps
triton's JITFunction.run for a recorder (`recording_launches`), which in a process that also runs kernels
(a test session on a GPU) would record that process's own launches instead of running them. `reports()`
starts that process; the command line is it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from . import sass
from .kernels import COMPILE_OPTIONS
from .kernels.spec import KernelSpec, pointer_types, signature_of

# Modules whose `aot_specs(arch)` list their kernels' launches on each target.
KERNEL_MODULES: tuple[str, ...] = ("echo_kernels.kernels.rotary", "echo_kernels.kernels.attention",
                                   "echo_kernels.kernels.attention_backward",
                                   "echo_kernels.kernels.plain_attention")
TARGETS = (80, 90)
# A launch's keyword arguments that are options of the compiler, not arguments of the kernel.
_LAUNCH_OPTIONS = ("num_warps", "num_stages", *COMPILE_OPTIONS)


# The Triton that CI installs: its report is benches/results/aot-report.txt, where no attention launch
# may spill. Reports of other versions are kept beside it as aot-report-triton-<version>.txt.
CI_TRITON = "3.8.0"
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benches", "results")


def report_path(version: str) -> str:
    """The committed report of Triton `version` (the table `python -m echo_kernels.aot` prints)."""
    name = "aot-report.txt" if version == CI_TRITON else f"aot-report-triton-{version}.txt"
    return os.path.join(RESULTS, name)


def recorded_spills(version: str) -> dict[tuple[str, int], int]:
    """{(kernel, sm): spill-store bytes} of the committed report of Triton `version`."""
    path = report_path(version)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no AOT report of Triton {version} at {path}: write it with "
                                f"python -m echo_kernels.aot > {path}")
    with open(path) as f:
        lines = f.read().splitlines()
    if not lines or f"Triton {version};" not in lines[0]:
        raise ValueError(f"{path} is not a report of Triton {version}: its header reads {lines[:1]}")
    return {(row[0], int(row[1])): int(row[4]) for row in _table_rows(lines, 0)}


def recorded_loops(version: str) -> dict[tuple[str, int], list[sass.LoopCounts]]:
    """{(kernel, sm): counts of its main loops} of the committed report of Triton `version`."""
    with open(report_path(version)) as f:
        rows = _table_rows(f.read().splitlines(), 1)
    if not rows:
        raise ValueError(f"{report_path(version)} has no main-loop table: write it again with "
                         f"python -m echo_kernels.aot > {report_path(version)}")
    loops: dict[tuple[str, int], list[sass.LoopCounts]] = {}
    for row in rows:
        counts = sass.LoopCounts(*map(int, row[3:9]))
        loops.setdefault((row[0], int(row[1])), []).append(counts)
    return loops


def _table_rows(lines: list[str], index: int) -> list[list[str]]:
    """The rows of table `index` of a report: each table is a title, a blank line, a header, rows."""
    starts = [i for i, line in enumerate(lines) if line.startswith(("Triton ", "Main loops"))]
    if index >= len(starts):
        return []
    end = next((i for i in range(starts[index] + 3, len(lines)) if not lines[i].strip()), len(lines))
    return [line.split() for line in lines[starts[index] + 3:end]]


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
    ctas_per_sm: int  # CTAs resident on one SM at once (registers, shared memory, threads)
    launch: str  # block sizes, warps, stages: "128x64/8w/2s" (launch_shape)
    main_loops: list[sass.LoopCounts]  # the loops that hold tensor-core instructions, in address order
    code: int  # SASS instructions of the whole kernel: what a program's instruction fetches draw from

    @classmethod
    def from_dict(cls, row: dict) -> "CompileReport":
        """Back from dataclasses.asdict (the --json file)."""
        return cls(**{**row, "main_loops": [sass.LoopCounts(**loop) for loop in row["main_loops"]]})


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself assembles `arch` with: from 3.9 on, sm_90 takes the newer of the two it
    ships (whose PTX version the older one refuses)."""
    from triton.backends.nvidia import compiler

    return compiler.get_ptxas(arch).path


def _ptxas_usage(ptx: str) -> tuple[int, int, int]:
    """(registers, spill-store bytes, stack bytes) as `ptxas -v` reports them for this PTX, run with
    the ptxas and flags Triton's own build uses (_ptxas; its register-allocation workaround)."""
    target = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE).group(1)
    arch = int(re.match(r"sm_(\d+)", target).group(1))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        base = [_ptxas(arch), "-lineinfo", "-v", f"--gpu-name={target}", path, "-o", path + ".o"]
        run = subprocess.run([*base[:3], "--regAllocOptLevel=2", *base[3:]], capture_output=True, text=True)
        if run.returncode != 0:  # an older ptxas without that option
            run = subprocess.run(base, capture_output=True, text=True, check=True)
    log = run.stderr + run.stdout
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return (int(registers.group(1)) if registers else -1, int(spills.group(1)) if spills else -1,
            int(stack.group(1)) if stack else -1)


def _jit_function(fn):
    """The JITFunction of a kernel (under the interpreter the kernel is an interpreter object; its
    Python function compiles as is)."""
    from triton.runtime.jit import JITFunction

    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)


@contextlib.contextmanager
def recording_launches():
    """Inside, every Triton launch is appended to the list this yields as (kernel, args, kwargs), and
    not run: triton's JITFunction.run is swapped for a recorder, for every thread, so only in a process
    that runs no kernel of its own (see the module's docstring)."""
    from triton.runtime.jit import JITFunction

    launches: list[tuple[object, tuple, dict]] = []
    run = JITFunction.run
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: launches.append((self, args, kwargs))
    try:
        yield launches
    finally:
        JITFunction.run = run


def _echo_launches() -> list[tuple[object, tuple, dict]]:
    """(kernel, args, kwargs) of every launch the launchers make at Echo's real shapes on the tile
    table in force (kernels.attention_common.tiles_of), captured and not run: the medium model's width
    (1024) split into heads of h = 32, 64, 128, T = 1500 frames, q, k, v and x as the head views of
    (B, T, D) projections, a bias table, a padding mask, with an M and without; the decoding step
    (Tq = 1 against 448 cached keys, and against the T encoder frames' keys cached rotated in the
    "interleaved" layout); the rotary ops at every h."""
    import torch

    from .kernels import (ECHO_MAX_REL_DIST, attention as attn, attention_backward as attn_bwd,
                          plain_attention as plain)
    from .kernels import rotary
    from .reference import UNBOUNDED

    with recording_launches() as launches:
        B, D, T = 2, 1024, 1500
        heads = lambda Tn, h, dt: torch.randn(B, Tn, D // h, h).to(dt).transpose(1, 2)  # (B, H, T, h) view
        for h in (32, 64, 128):
            for dt in (torch.bfloat16, torch.float16, torch.float32):
                w, s = torch.rand(h // 2), torch.ones(1)
                bias, pad = (torch.randn(2 * ECHO_MAX_REL_DIST - 1, D // h),
                             torch.zeros(B, T, dtype=torch.bool))
                shapes = [(T, T, UNBOUNDED, UNBOUNDED, 0)]
                if h == 64 and dt == torch.bfloat16:
                    shapes.append((1, 448, UNBOUNDED, 0, 447))
                if dt != torch.float16:  # the plain flash kernels, the floor of the rows above
                    q, k, v = (heads(T, h, dt) for _ in range(3))
                    out, lse = plain.forward(q, k, v)
                    plain.backward(torch.randn_like(out), q, k, v, out, lse)
                for Tq, Tk, left, right, q_off in shapes:
                    q, k, v = heads(Tq, h, dt), heads(Tk, h, dt), heads(Tk, h, dt)
                    for M in (torch.randn(h, h), None):
                        args = (M, w, s, bias, pad[:, :Tk], left, right, q_off, 0, "half_split")
                        out, lse = attn.forward(q, k, v, *args)
                        for dq_in_key_pass in (False, True):  # both ways of summing dq
                            with attn_bwd.dq_in_key_pass(dq_in_key_pass):
                                attn_bwd.backward(torch.randn_like(out), q, k, v, out, lse, *args)
                if h == 64 and dt == torch.bfloat16:  # cross-attention's decoding step
                    q, k, v = heads(1, h, dt), heads(T, h, dt), heads(T, h, dt)
                    attn.forward(q, k, v, None, w, s, bias, None, UNBOUNDED, UNBOUNDED, 447, 0, "interleaved",
                                 keys_rotated=True)
        for h in rotary.HEAD_DIMS:
            for dt, layout in [(torch.bfloat16, "half_split")] + ([(torch.float16, "half_split"), (
                    torch.float32, "half_split"), (torch.bfloat16, "interleaved")] if h == 64 else []):
                x = torch.randn(B, T, D // h, h).to(dt)
                M, w, s = torch.randn(h, h), torch.rand(h // 2), torch.ones(1)
                rotary.rotary_forward(x, M, w, s, 1.0, 0, layout)
                rotary.rotary_backward(torch.randn_like(x), x, M, w, s, 1.0, 0, layout)
    return launches


def spec_of_launch(kernel, args: tuple, kwargs: dict) -> KernelSpec:
    """The KernelSpec of a launch captured by recording_launches: its constexprs, warps and stages, its
    tensors as pointers of their element types and its floats as fp32 (compile it with
    compile_spec(spec, arch, launch=(args, kwargs)) to take the JIT's specialisation of it)."""
    import torch

    bound = dict(zip(kernel.arg_names, args))
    constexprs = {name: value for name, value in kwargs.items() if name not in _LAUNCH_OPTIONS}
    types = pointer_types()
    pointers = {name: types[a.dtype] for name, a in bound.items() if isinstance(a, torch.Tensor)}
    pointers.update({name: "fp32" for name, a in bound.items() if isinstance(a, float)})
    return KernelSpec(kernel.fn.__name__, kernel, signature_of(kernel, pointers, constexprs), constexprs,
                      num_warps=kwargs["num_warps"], num_stages=kwargs["num_stages"])


def _matches(spec: KernelSpec, kernel, args: tuple, kwargs: dict) -> bool:
    """Whether a captured launch is the one `spec` lists: the same kernel, constexprs, warps and
    stages, pointers of the same element types, and the compiler options the report compiles with
    (kernels.COMPILE_OPTIONS)."""
    if _jit_function(spec.fn).fn is not kernel.fn:
        return False
    bound = dict(zip(kernel.arg_names, args), **kwargs)
    types = pointer_types()
    pointers_agree = all(types.get(getattr(bound.get(name), "dtype", None)) == kind
                         for name, kind in spec.signature.items() if kind.startswith("*"))
    options = {**spec.constexprs, **COMPILE_OPTIONS}
    return (pointers_agree and all(bound.get(k) == v for k, v in options.items())
            and bound.get("num_warps", 4) == spec.num_warps and bound.get("num_stages", 3) == spec.num_stages)


def _jit_specialisation(fn, args: tuple, kwargs: dict, arch: int) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ASTSource, as triton's JIT builds them for this launch on
    compute capability `arch`: integer arguments equal to 1 become constexprs, and integers and
    pointers divisible by 16 carry the divisibility attribute, in the installed Triton's own terms
    (its binder and _pack_args, the same from 3.6 to 3.8)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    if not hasattr(fn, "_pack_args"):
        import triton

        raise RuntimeError(f"triton {triton.__version__}: JITFunction has no _pack_args, so the JIT's "
                           "specialisation of a launch cannot be reproduced; echo_kernels.aot supports "
                           "Triton's binder and _pack_args API (3.6 to 3.8)")
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    launch = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
    bound, specialization, options = binder(*args, **launch)
    _, signature, constexprs, attrs = fn._pack_args(backend, launch, bound, specialization, options)
    return signature, constexprs, attrs


_LAUNCHES: dict[int, list] = {}  # arch -> _echo_launches() on its tile table, captured once


def _compile(spec: KernelSpec, arch: int, launch: tuple[tuple, dict] | None = None):
    """triton.compile of one launch for compute capability `arch`, specialised as the JIT specialises
    the real launch that `spec` lists: `launch` (args, kwargs) where given, else the one of
    _echo_launches that matches it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .kernels.attention_common import tiles_of

    fn = _jit_function(spec.fn)
    if launch is None:
        if arch not in _LAUNCHES:
            with tiles_of(arch):
                _LAUNCHES[arch] = _echo_launches()
        found = next((found for found in _LAUNCHES[arch] if _matches(spec, *found)), None)
        if found is None:
            raise ValueError(f"no launch at Echo's shapes matches the AOT spec {spec.name}: its constexprs, "
                             "warps, stages, compiler options or pointer types differ from every launch the "
                             "launchers make")
        launch = found[1:]
    signature, constexprs, attrs = _jit_specialisation(fn, *launch, arch)
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages, **COMPILE_OPTIONS}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _report(spec: KernelSpec, arch: int, compiled, usage: tuple[int, int, int],
            listing: tuple[list[sass.LoopCounts], int]) -> CompileReport:
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
        ctas_per_sm=sass.ctas_per_sm(arch, registers, compiled.metadata.shared, spec.num_warps),
        main_loops=listing[0],
        launch=launch_shape(spec),
        code=listing[1],
    )


def launch_shape(spec: KernelSpec) -> str:
    """The tile and launch shape of a launch, as the report prints it: its block sizes (BLOCK_M x
    BLOCK_N; BLOCK where one axis is tiled; the rotary kernel's BLOCK_T x BLOCK_K x BLOCK_P), warps,
    stages."""
    c = spec.constexprs
    sizes = [str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK", "BLOCK_T", "BLOCK_K", "BLOCK_P") if k in c]
    return f"{'x'.join(sizes) or '-'}/{spec.num_warps}w/{spec.num_stages}s"


def _sass_counts(compiled) -> tuple[list[sass.LoopCounts], int]:
    """(its main loops' counts, its size in instructions) of a compiled kernel's SASS."""
    listing = sass.disassemble(compiled.asm["cubin"])
    return sass.main_loops(listing), sass.code_size(listing)


def compile_spec(spec: KernelSpec, arch: int, launch: tuple[tuple, dict] | None = None) -> CompileReport:
    """Compile one launch for compute capability `arch` (80, 90) and report on it. launch: the
    (args, kwargs) of a real launch of a kernel that Echo's launchers do not make."""
    compiled = _compile(spec, arch, launch)
    return _report(spec, arch, compiled, _ptxas_usage(compiled.asm["ptx"]), _sass_counts(compiled))


def all_specs(arch: int) -> list[KernelSpec]:
    """Every launch to compile for `arch`, at the sizes of its tile table."""
    specs = []
    for module in KERNEL_MODULES:
        specs.extend(importlib.import_module(module).aot_specs(arch))
    return specs


def _compile_all(arches) -> list[CompileReport]:
    by_arch = {arch: {spec.name: spec for spec in all_specs(arch)} for arch in arches}
    names = list(by_arch[arches[0]])
    if any(list(specs) != names for specs in by_arch.values()):  # a report row is one launch on each target
        raise ValueError(f"the targets {list(arches)} list launches of different names")
    jobs = [(by_arch[arch][name], arch) for name in names for arch in arches]
    compiled = [_compile(spec, arch) for spec, arch in jobs]
    # ptxas and nvdisasm run as child processes per kernel: in parallel, one per core.
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        usages = list(pool.map(_ptxas_usage, [c.asm["ptx"] for c in compiled]))
        listings = list(pool.map(_sass_counts, compiled))
    return [_report(spec, arch, c, usage, listing)
            for (spec, arch), c, usage, listing in zip(jobs, compiled, usages, listings)]


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _without_interpreter(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`python -m echo_kernels.aot ARGS` in a child process with the interpreter off: kernels defined
    under it are interpreter objects, which do not compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "echo_kernels.aot", *args], env=env, **kwargs)


def reports(arches=TARGETS) -> list[CompileReport]:
    """Compile every kernel for every target, in a child process (see the module's docstring)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        args = ["--json", f.name, "--arch", *map(str, arches)]
        run = _without_interpreter(args, capture_output=True, text=True)
        if run.returncode != 0:  # the compiler's own message, not just an exit status
            raise RuntimeError(f"python -m echo_kernels.aot {' '.join(args)} failed:\n{run.stderr[-4000:]}")
        return [CompileReport.from_dict(row) for row in json.load(open(f.name))]


def sass_listing(name: str, arch: int) -> str:
    """The SASS of the launch `name` (a kernel row of the report) compiled for `arch`, its main loops
    marked (echo_kernels.sass.mark_main_loops)."""
    spec = next((s for s in all_specs(arch) if s.name == name), None)
    if spec is None:
        raise ValueError(f"no launch named {name!r}: the report's first table lists them")
    return sass.mark_main_loops(sass.disassemble(_compile(spec, arch).asm["cubin"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(TARGETS))
    parser.add_argument("--json", help="write the reports to this file as JSON")
    parser.add_argument("--sass", metavar="NAME", help="print the SASS of this launch, its main loops marked")
    args = parser.parse_args()
    if _interpreted():
        sys.exit(_without_interpreter(sys.argv[1:]).returncode)
    if args.sass:
        for arch in args.arch:
            try:
                listing = sass_listing(args.sass, arch)
            except ValueError as e:
                parser.error(str(e))
            print(f"// {args.sass}, sm_{arch}\n{listing}")
        return
    rows = _compile_all(args.arch)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
        return
    import triton

    print(table(rows, triton.__version__))


def table(rows: list[CompileReport], version: str) -> str:
    """The report as committed (benches/results/aot-report*.txt; recorded_spills and recorded_loops
    read it back): per launch, then per main loop of each launch."""
    lines = [f"Triton {version}; spill = ptxas spill stores, stack = stack frame (bytes), "
             "ctas = CTAs per SM, launch = block sizes / warps / stages, code = SASS instructions of "
             "the kernel", "",
             f"{'kernel':40} {'sm':>3} {'shared':>8} {'regs':>5} {'spill':>6} {'stack':>6} {'mma':>4} "
             f"{'wgmma':>6} {'ctas':>5} {'launch':>16} {'code':>6}"]
    for r in rows:
        lines.append(f"{r.name:40} {r.arch:>3} {r.shared_bytes:>8} {r.registers:>5} {r.spilled_bytes:>6} "
                     f"{r.stack_bytes:>6} {'yes' if r.mma else 'no':>4} {'yes' if r.wgmma else 'no':>6} "
                     f"{r.ctas_per_sm:>5} {r.launch:>16} {r.code:>6}")
    lines += ["", "Main loops (SASS, the innermost loops with tensor-core instructions, static counts per "
              "loop body): instr = all, tc = tensor-core, sync / async = global loads waited on / copied "
              "asynchronously (cp.async, TMA), ex2 and sincos on the MUFU", "",
              f"{'kernel':40} {'sm':>3} {'loop':>4} {'instr':>6} {'tc':>4} {'sync':>5} {'async':>5} "
              f"{'ex2':>4} {'sincos':>6} {'instr/tc':>8}"]
    for r in rows:
        for i, c in enumerate(r.main_loops):
            lines.append(f"{r.name:40} {r.arch:>3} {i:>4} {c.instructions:>6} {c.tensor_core:>4} "
                         f"{c.sync_loads:>5} {c.async_loads:>5} {c.exp2:>4} {c.sin_cos:>6} "
                         f"{c.per_tensor_core:>8.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
