"""rotary_orthogonal's Triton kernel against the float64 reference: forward in both layouts, strided
input, offsets, ragged T, every h the model uses; gradients of x, M, w and s; the custom op
(opcheck, torch.compile); the dispatch; and the ahead-of-time compile for sm_80 / sm_90.

Without a GPU the kernels run through the Triton interpreter (tests/conftest.py), on small shapes.
"""

import pytest
import torch
import triton

import echo_kernels
from echo_kernels import aot, reference
from echo_kernels.kernels import rotary as kernels
from echo_kernels.kernels.angles import MAX_ANGLE

from numerics import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter mishandles bf16, so on the CPU the kernel is checked in fp32 and fp16.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# Roundings to a half dtype on the way to each result (float32 accumulation not counted): forward,
# M as a dot operand and the output; backward, M as an operand, du as one and dx stored.
FORWARD_ROUNDINGS, BACKWARD_ROUNDINGS = 2, 3


def tolerance(dtype: torch.dtype, roundings: int) -> float:
    """Relative error allowed against the float64 reference on the same inputs: float32 1e-5 (fp32
    angles and products); a half dtype, what its roundings allow (x and dy are its only inputs in
    that dtype; M, w and s stay float32)."""
    return 1e-5 if dtype == torch.float32 else reference.rounding_tolerance(dtype, roundings)
LAYOUTS = ("half_split", "interleaved")


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("ECHO_BACKEND", "triton")


def make_inputs(B, T, H, h, dtype, strided, seed=0):
    """Random x (optionally a (B, T, H, h) view of a (B, H, T, h) tensor), M, w and a learned s."""
    g = torch.Generator().manual_seed(seed)
    if strided:
        x = torch.randn(B, H, T, h, generator=g).transpose(1, 2)
    else:
        x = torch.randn(B, T, H, h, generator=g)
    M = torch.randn(h, h, generator=g) / h**0.5
    w = 0.2 + torch.rand(h // 2, generator=g)
    s = 0.5 + torch.rand((), generator=g)  # not 1: s scales every angle
    return x.to(DEVICE, dtype), M.to(DEVICE), w.to(DEVICE), s.to(DEVICE)


def reference64(x, M, w, s, offset, layout):
    return reference.rotary_orthogonal(x.double(), M.double(), w.double(), s.double(), offset, layout)


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h", kernels.HEAD_DIMS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_reference(h, layout, dtype):
    # T = 70: a full block of 64 positions and a ragged one; (B, H, T, h) storage read in place.
    x, M, w, s = make_inputs(2, 70, 3, h, dtype, strided=True)
    y = echo_kernels.rotary_orthogonal(x, M, w, s, offset=11, layout=layout)
    assert y.dtype == dtype and y.shape == x.shape
    assert y.stride() == x.stride()  # y laid out like x: no copy on the way in or out
    assert rel_err(y, reference64(x, M, w, s, 11, layout)) < tolerance(dtype, FORWARD_ROUNDINGS)


@pytest.mark.parametrize("T", [1, 13, 37])
@pytest.mark.parametrize("strided", [False, True])
def test_forward_ragged_lengths_and_offsets(T, strided):
    x, M, w, s = make_inputs(1, T, 5, 64, torch.float32, strided, seed=T)
    for offset in (0, 50):
        y = echo_kernels.rotary_orthogonal(x, M, w, s, offset=offset)
        assert rel_err(y, reference64(x, M, w, s, offset, "half_split")) < 1e-5


def test_forward_far_positions_match_fp32_angles():
    # At position 1000 an fp32 angle phi = (s t) w is itself off by ~1e-4 rad, in the reference's
    # fp32 maths as much as here; the kernel computes the same fp32 angle, so it is held to the
    # fp32 reference, and to the float64 one with the angle error allowed for.
    x, M, w, s = make_inputs(1, 37, 5, 64, torch.float32, strided=True)
    y = echo_kernels.rotary_orthogonal(x, M, w, s, offset=1000)
    assert rel_err(y, reference.rotary_orthogonal(x, M, w, s, 1000)) < 1e-5
    assert rel_err(y, reference64(x, M, w, s, 1000, "half_split")) < 1e-4


@pytest.mark.parametrize("offset", [10**5, 10**6, 10**7, 2 * 10**9])
def test_forward_exact_at_any_reachable_angle(offset):
    # phi up to ~1e9 rad (offset 2e9 at s w ~ 0.6): the angle reduction must stay exact where an
    # fp32 Cody-Waite reduction is off by whole radians. Held to the fp32 reference: the fp32 angle
    # itself is off by up to 64 rad at 1e9, the same in both.
    x, M, w, s = make_inputs(1, 9, 2, 32, torch.float32, strided=False, seed=offset % 97)
    w = w / w.max()
    y = echo_kernels.rotary_orthogonal(x, M, w, s, offset=offset)
    assert rel_err(y, reference.rotary_orthogonal(x, M, w, s, offset)) < 1e-6
    x.requires_grad_()
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(echo_kernels.rotary_orthogonal(x, M, w, s, offset=offset), x, dy)
    (ref_dx,) = torch.autograd.grad(reference.rotary_orthogonal(x, M, w, s, offset), x, dy)
    assert rel_err(dx, ref_dx) < 1e-6


def test_forward_beyond_exact_angles_is_nan_not_wrong():
    # |phi| >= MAX_ANGLE (6.7e9 rad) is past what the kernel reduces exactly: NaN, never a wrong
    # rotation; positions whose angles stay below it are unaffected.
    x, M, w, _ = make_inputs(1, 4, 1, 32, torch.float32, strided=False)
    w = torch.ones_like(w)
    s = MAX_ANGLE.value / 1000.5  # positions 999 and 1000 below it, 1001 and 1002 beyond
    y = echo_kernels.rotary_orthogonal(x, M, w, s, offset=999)
    assert torch.isfinite(y[:, :2]).all() and torch.isnan(y[:, 2:]).all()


def test_forward_float_scale_and_many_heads():
    # H = 7 heads is not a multiple of the heads a program takes: the last chunk is partial.
    x, M, w, _ = make_inputs(3, 20, 7, 32, torch.float32, strided=False)
    y = echo_kernels.rotary_orthogonal(x, M, w, 1.0, offset=3, layout="interleaved")
    ref = reference.rotary_orthogonal(x.double(), M.double(), w.double(), 1.0, 3, "interleaved")
    assert rel_err(y, ref) < 1e-5


def test_forward_reads_strided_weights():
    x, M, w, s = make_inputs(1, 9, 2, 32, torch.float32, strided=False)
    Mt = M.t().contiguous().t()  # column-major M
    w2 = torch.stack([w, w], dim=1)[:, 0]  # w with stride 2
    y = echo_kernels.rotary_orthogonal(x, Mt, w2, s, offset=2)
    assert rel_err(y, reference64(x, M, w, s, 2, "half_split")) < 1e-5


def test_empty_input():
    x, M, w, s = make_inputs(2, 0, 3, 32, torch.float32, strided=False)
    assert echo_kernels.rotary_orthogonal(x, M, w, s).shape == x.shape


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------


def grads_of(fn, x, M, w, s, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, M, w, s)]
    fn(*leaves).backward(dy)
    return [t.grad for t in leaves]


def assert_fp32_gradients_match(x, M, w, s, dy, **options):
    """The kernel's gradients of fp32 x, M, w and s against the float64 reference's, within 1e-5; ds, one
    sum over every token of t dphi, carries the fp32 angles' rounding times that sum's cancellation, and
    is held to twice the fp32 reference's own error."""
    got = grads_of(lambda *a: echo_kernels.rotary_orthogonal(*a, **options), x, M, w, s, dy)
    want = grads_of(lambda *a: reference.rotary_orthogonal(*a, **options), x.double(), M.double(), w.double(),
                    s.double(), dy.double())
    ds32 = grads_of(lambda *a: reference.rotary_orthogonal(*a, **options), x.cpu(), M.cpu(), w.cpu(), s.cpu(),
                    dy.cpu())[3]
    for name, g, ref in zip(("x", "M", "w", "s"), got, want):
        tol = 2 * rel_err(ds32, want[3].cpu()) if name == "s" else 1e-5
        assert rel_err(g, ref) < tol, (name, rel_err(g, ref), tol)


@pytest.mark.parametrize("h", kernels.HEAD_DIMS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_reference(h, layout, dtype):
    x, M, w, s = make_inputs(2, 70, 3, h, dtype, strided=True, seed=h)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)  # rounded alike
    offset = 5
    got = grads_of(lambda *a: echo_kernels.rotary_orthogonal(*a, offset=offset, layout=layout), x, M, w, s,
                   dy)
    want = grads_of(lambda *a: reference.rotary_orthogonal(*a, offset=offset, layout=layout),
                    x.double(), M.double(), w.double(), s.double(), dy.double())
    for name, g, ref in zip(("x", "M", "w", "s"), got, want):
        assert g.dtype == {"x": dtype}.get(name, torch.float32)
        # ds is one sum over every token of t dphi: in fp32 it carries the rounding of the fp32
        # angles times that sum's cancellation (the fp32 reference's own ds is as far off).
        tol = 3e-5 if (name, dtype) == ("s", torch.float32) else tolerance(dtype, BACKWARD_ROUNDINGS)
        assert rel_err(g, ref) < tol, (name, rel_err(g, ref), tol)


def test_gradients_with_float_scale_and_strided_dy():
    x, M, w, _ = make_inputs(2, 37, 4, 64, torch.float32, strided=False)
    dy = torch.randn(2, 4, 37, 64, device=DEVICE).transpose(1, 2)  # dy strided too
    leaves = [t.clone().requires_grad_() for t in (x, M, w)]
    echo_kernels.rotary_orthogonal(*leaves, 0.75, offset=9, layout="interleaved").backward(dy)
    refs = [t.double().requires_grad_() for t in (x, M, w)]
    reference.rotary_orthogonal(*refs, 0.75, 9, "interleaved").backward(dy.double())
    for leaf, ref in zip(leaves, refs):
        assert rel_err(leaf.grad, ref.grad) < 1e-5


def test_gradients_over_units_shared_unevenly(monkeypatch):
    """The backward's programs walk several units of several heads each, loading each head's tiles
    while the head before it runs, across units too; here 3 programs share 14 units of 2 heads, so
    one program runs a unit fewer, and the last t block is ragged."""
    monkeypatch.setattr(kernels, "_programs_available", lambda device: 3)
    x, M, w, s = make_inputs(1, 100, 4, 64, torch.float32, strided=True, seed=3)
    cfg = kernels._config(64, torch.float32, backward=True)
    n_blocks = -(-100 // cfg["BLOCK_T"])
    heads = kernels._heads_per_program(n_blocks, 4, 4 * 3)
    n_units = n_blocks * 4 // heads
    assert heads > 1 and n_units % 3 != 0 and 100 % cfg["BLOCK_T"] != 0
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    assert_fp32_gradients_match(x, M, w, s, dy, offset=3)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_head_chunks_need_not_divide_the_heads(monkeypatch, layout):
    """The launchers give each program a divisor of H heads, but the kernels stop at H whatever the
    chunk: 3 heads per program over H = 4 leave each t block's last chunk one head (its program runs
    that one), forward and backward, in units shared unevenly by 2 programs."""
    monkeypatch.setattr(kernels, "_heads_per_program", lambda n_blocks, H, wanted: 3)
    monkeypatch.setattr(kernels, "_programs_available", lambda device: 2)
    x, M, w, s = make_inputs(1, 70, 4, 32, torch.float32, strided=True, seed=5)
    y = echo_kernels.rotary_orthogonal(x, M, w, s, offset=2, layout=layout)
    assert rel_err(y, reference64(x, M, w, s, 2, layout)) < 1e-5
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    assert_fp32_gradients_match(x, M, w, s, dy, offset=2, layout=layout)


def test_backward_is_deterministic():
    x, M, w, s = make_inputs(2, 130, 4, 32, torch.float32, strided=False)
    dy = torch.randn(x.shape, device=DEVICE)
    first = kernels.rotary_backward(dy, x, M, w, s, 0.0, 3, "half_split")
    second = kernels.rotary_backward(dy, x, M, w, s, 0.0, 3, "half_split")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# Dispatch and the custom op
# --------------------------------------------------------------------------------------------------


def test_dispatch_follows_echo_backend(monkeypatch):
    calls = []
    launcher = kernels.rotary_forward
    monkeypatch.setattr(kernels, "rotary_forward", lambda *a: calls.append(1) or launcher(*a))
    x, M, w, s = make_inputs(1, 5, 2, 32, torch.float32, strided=False)
    echo_kernels.rotary_orthogonal(x, M, w, s)
    assert calls == [1]
    monkeypatch.setenv("ECHO_BACKEND", "reference")
    echo_kernels.rotary_orthogonal(x, M, w, s)
    assert calls == [1]
    if DEVICE == "cpu":  # auto leaves CPU tensors to the reference: the interpreter is for tests
        monkeypatch.setenv("ECHO_BACKEND", "auto")
        echo_kernels.rotary_orthogonal(x, M, w, s)
        assert calls == [1]
    # float64 stays with the reference whatever the backend
    monkeypatch.setenv("ECHO_BACKEND", "triton")
    echo_kernels.rotary_orthogonal(x.double(), M, w, s)
    assert calls == [1]


def test_eager_calls_skip_the_wrapping():
    x, M, w, s = make_inputs(1, 5, 2, 32, torch.float32, strided=False)
    assert echo_kernels.rotary_orthogonal(x, M, w, s).grad_fn is None  # the raw launcher
    y = echo_kernels.rotary_orthogonal(x, M.requires_grad_(), w, s)
    assert type(y.grad_fn).__name__ == "_EagerKernelOpBackward"  # the launchers, not the op


def op_args(s_is_tensor: bool, layout: str, requires_grad: bool):
    x, M, w, s = make_inputs(1, 9, 2, 32, torch.float32, strided=True)
    x, M, w, s = (t.requires_grad_(requires_grad) for t in (x, M, w, s))
    return (x, M, w, s, 0.0, 4, layout) if s_is_tensor else (x, M, w, None, 0.8, 4, layout)


@pytest.mark.parametrize("s_is_tensor", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(s_is_tensor, layout):
    args = op_args(s_is_tensor, layout, requires_grad=True)
    torch.library.opcheck(torch.ops.echo_kernels.rotary_orthogonal.default, args)
    dy = torch.randn(args[0].shape, device=DEVICE)
    backward_args = (dy, *(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    torch.library.opcheck(torch.ops.echo_kernels.rotary_orthogonal_backward.default, backward_args)


def test_torch_compile_fullgraph():
    x, M, w, s = make_inputs(2, 13, 3, 32, torch.float32, strided=True)
    leaves = [t.clone().requires_grad_() for t in (x, M, w, s)]

    @torch.compile(fullgraph=True)
    def f(x, M, w, s):
        return echo_kernels.rotary_orthogonal(x, M, w, s, offset=7, layout="interleaved") * 2

    y = f(*leaves)
    assert rel_err(y, 2 * reference64(x, M, w, s, 7, "interleaved")) < 1e-5
    y.sum().backward()
    want = grads_of(lambda *a: 2 * reference.rotary_orthogonal(*a, 7, "interleaved"),
                    x.double(), M.double(), w.double(), s.double(), torch.ones(x.shape, dtype=torch.float64))
    for leaf, ref in zip(leaves, want):
        assert rel_err(leaf.grad, ref) < 1e-5


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile for real GPUs
# --------------------------------------------------------------------------------------------------


def test_aot_compiles_for_sm80_and_sm90(aot_reports):
    aot_reports = [r for r in aot_reports if r.name.startswith("rotary_")]
    names = {spec.name for spec in kernels.aot_specs(80)}
    assert names == {spec.name for spec in kernels.aot_specs(90)}
    assert {(r.name, r.arch) for r in aot_reports} == {(n, a) for n in names for a in aot.TARGETS}
    recorded_loops = aot.recorded_loops(triton.__version__)
    recorded_spills = aot.recorded_spills(triton.__version__)
    assert all(r.main_loops == recorded_loops.get((r.name, r.arch), []) for r in aot_reports)
    print(f"\n{'kernel':36} {'sm':>3} {'shared':>7} {'regs':>5} {'spill':>6} {'mma':>4} {'wgmma':>6}")
    for r in aot_reports:
        print(f"{r.name:36} {r.arch:>3} {r.shared_bytes:>7} {r.registers:>5} {r.spilled_bytes:>6} "
              f"{'yes' if r.mma else 'no':>4} {'yes' if r.wgmma else 'no':>6}")
        assert r.shared_bytes > 0  # M's slices and the x tile are staged in shared memory
        assert 0 < r.registers <= 255
        # as recorded; test_aot.py bounds them
        assert r.spilled_bytes == recorded_spills[(r.name, r.arch)], r.name
        if "_fp32_" in r.name:
            # fp32 inputs take exact fp32 dots (input_precision="ieee"): no tensor cores, by design.
            assert not r.mma
        else:
            assert r.mma, f"{r.name} has no tensor-core dot on sm_{r.arch}"
            if r.arch == 80:
                assert not r.wgmma
            elif r.name.startswith("rotary_fwd_"):
                # 64-row forward tiles are one warpgroup's: Hopper's wgmma. The backward's 32-row
                # tiles are too small for it at h = 32 and the compiler picks mma.sync there.
                assert r.wgmma


def test_backward_loop_runs_the_rotation_once_per_tile():
    """The backward's loop over heads executes at most 1.5 h warp-instructions per token and head (h
    padded to a power of two; bf16 and fp16, as the committed report of the installed Triton records
    it): the conjugate rotation runs once per tile, in the tile's own layout. Pipelined through shared
    memory, dy was read in the products' operand layout, whole in every warp, and every warp ran the
    rotation: 3.6 h at h = 64 on sm_80 (docs/model.md, rotary_orthogonal)."""
    recorded = aot.recorded_loops(triton.__version__)
    checked = 0
    for arch in aot.TARGETS:
        for spec in kernels.aot_specs(arch):
            if not spec.name.startswith("rotary_bwd_") or "_fp32_" in spec.name:
                continue
            (loop,) = recorded[(spec.name, arch)]
            tokens, h = spec.constexprs["BLOCK_T"], spec.constexprs["BLOCK_K"]
            assert loop.instructions * spec.num_warps / tokens <= 1.5 * h, (spec.name, arch, loop)
            checked += 1
    assert checked == 2 * 6
