"""The compiled orthogonal_product (csrc/): against the float64 reference, gradients, opcheck,
torch.compile, determinism, bad input, and (marked gpu) the CUDA kernel."""

import itertools
import os
import shutil

import pytest
import torch

import echo_kernels as ek
from echo_kernels import _extension, backend, reference

from numerics import rel_err


op = torch.ops.echo_kernels.orthogonal_product if _extension.LOADED else None
op_backward = torch.ops.echo_kernels.orthogonal_product_backward if _extension.LOADED else None


def test_extension_is_built():
    """pip install builds echo_kernels._C; every other test here needs it."""
    assert _extension.LOADED, _extension.LOAD_ERROR


def make_pairs(kind: str, h: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 2) int64 pairs: adjacent (k, k+1), random (i != j, overlapping), disjoint (random perfect
    matchings one after another) or all (every i < j once, shuffled: n = h(h-1)/2)."""
    if kind == "adjacent":
        k = torch.arange(n) % (h - 1)
        return torch.stack([k, k + 1], dim=1)
    if kind == "random":
        i = torch.randint(0, h, (n,), generator=generator)
        j = (i + torch.randint(1, h, (n,), generator=generator)) % h
        return torch.stack([i, j], dim=1)
    if kind == "disjoint":
        rows = []
        while len(rows) < n:
            perm = torch.randperm(h, generator=generator)
            rows += perm[: 2 * (h // 2)].view(-1, 2).tolist()
        return torch.tensor(rows[:n], dtype=torch.int64)
    if kind == "all":
        pairs = torch.tensor(list(itertools.combinations(range(h), 2)), dtype=torch.int64)
        return pairs[torch.randperm(len(pairs), generator=generator)][:n]
    raise ValueError(kind)


def inputs(h, n, kind="random", theta_batch=(), r_batch=(), dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    pairs = make_pairs(kind, h, n, g).to(device)
    thetas = (torch.rand(*theta_batch, n, generator=g, dtype=torch.float64) * 6.0 - 3.0).to(device, dtype)
    R = torch.randn(*r_batch, h, h, generator=g, dtype=torch.float64).to(device, dtype)
    return thetas, pairs, R


# -- forward and backward against the float64 reference ----------------------------------------------

SIZES = [(h, n) for h in (16, 64, 128) for n in (1, h // 2, h * (h - 1) // 2)]
# Every (size, pair kind, product order), except that h = 128 with every pair runs once: its
# Python reference alone takes seconds.
FORWARD_CASES = [
    (h, n, kind, givens_first)
    for h, n in SIZES
    for kind in ("adjacent", "random", "disjoint")
    for givens_first in (True, False)
    if not (h == 128 and n == h * (h - 1) // 2 and not (kind == "random" and givens_first))
]


@pytest.mark.parametrize(
    "h,n,kind,givens_first", FORWARD_CASES,
    ids=[f"h{h}-N{n}-{kind}-{'GR' if gf else 'RG'}" for h, n, kind, gf in FORWARD_CASES],
)
def test_forward_matches_reference(h, n, kind, givens_first):
    full = n == h * (h - 1) // 2
    if full and kind == "adjacent":
        kind = "all"
    batch = ((), ()) if full and h > 16 else ((3, 1), (2,))
    thetas, pairs, R = inputs(h, n, kind, *batch, seed=h + n)
    M = op(thetas, pairs, R, givens_first)
    expected = reference.orthogonal_product(thetas, pairs, R, givens_first)
    assert M.shape == expected.shape and M.dtype == torch.float64
    assert rel_err(M, expected) < 1e-10


BACKWARD_CASES = [
    # h, n, kind, theta batch, R batch
    (16, 120, "all", (), ()),
    (16, 40, "random", (2, 3), (2, 3)),
    (64, 32, "adjacent", (4,), ()),  # R shared by all entries: its gradient is summed
    (64, 32, "disjoint", (), (5,)),  # thetas shared: their gradient is summed
    (64, 300, "random", (2, 1), (1, 3)),
    (37, 50, "random", (3,), (3,)),  # h not a multiple of 32
    (128, 64, "random", (2,), (2,)),
]


@pytest.mark.parametrize("h,n,kind,tb,rb", BACKWARD_CASES)
@pytest.mark.parametrize("givens_first", [True, False], ids=["GR", "RG"])
def test_gradients_match_reference(h, n, kind, tb, rb, givens_first):
    thetas, pairs, R = inputs(h, n, kind, tb, rb, seed=n)
    thetas.requires_grad_(True)
    R.requires_grad_(True)
    M = op(thetas, pairs, R, givens_first)
    expected = reference.orthogonal_product(thetas, pairs, R, givens_first)
    assert rel_err(M, expected) < 1e-10
    upstream = torch.randn(M.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(M, (thetas, R), upstream)
    want = torch.autograd.grad(expected, (thetas, R), upstream)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert rel_err(g, w) < 1e-10


def test_empty_product_is_R():
    thetas, pairs, R = inputs(8, 0, "random", (2,), (2,))
    assert torch.equal(op(thetas, pairs, R, True), R)


# -- autograd, opcheck, torch.compile ----------------------------------------------------------------


@pytest.mark.parametrize("givens_first", [True, False], ids=["GR", "RG"])
def test_gradcheck(givens_first):
    thetas, pairs, R = inputs(6, 11, "random", (3, 1), (2,), seed=3)  # batches broadcast to (3, 2)
    thetas.requires_grad_(True)
    R.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t, r: op(t, pairs, r, givens_first), (thetas, R))


@pytest.mark.parametrize("givens_first", [True, False], ids=["GR", "RG"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(givens_first, dtype):
    thetas, pairs, R = inputs(8, 13, "random", (2,), (2,), dtype=dtype, seed=4)
    for grads in (False, True):
        args = (thetas.clone().requires_grad_(grads), pairs, R.clone().requires_grad_(grads), givens_first)
        torch.library.opcheck(op.default, args)
    M = op(thetas, pairs, R, givens_first)
    torch.library.opcheck(op_backward.default, (torch.randn_like(M), thetas, pairs, M, givens_first))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    thetas, pairs, R = inputs(16, 24, "random", (3,), (), dtype=torch.float32, seed=5)

    def f(thetas, R):
        return (ek.orthogonal_product(thetas, pairs, R, True)
                @ ek.orthogonal_product(thetas, pairs, R, False)).sum()

    t1, r1 = thetas.clone().requires_grad_(True), R.clone().requires_grad_(True)
    t2, r2 = thetas.clone().requires_grad_(True), R.clone().requires_grad_(True)
    compiled = torch.compile(f, fullgraph=True)
    out, want = compiled(t1, r1), f(t2, r2)
    torch.testing.assert_close(out, want)
    out.backward()
    want.backward()
    torch.testing.assert_close(t1.grad, t2.grad)
    torch.testing.assert_close(r1.grad, r2.grad)


def test_activation_checkpointing():
    from torch.utils.checkpoint import checkpoint

    thetas, pairs, R = inputs(16, 30, "random", (2,), (), seed=6)
    t1, r1 = thetas.clone().requires_grad_(True), R.clone().requires_grad_(True)
    t2, r2 = thetas.clone().requires_grad_(True), R.clone().requires_grad_(True)
    checkpoint(lambda t, r: op(t, pairs, r, True).square().sum(), t1, r1, use_reentrant=False).backward()
    op(t2, pairs, r2, True).square().sum().backward()
    assert torch.equal(t1.grad, t2.grad) and torch.equal(r1.grad, r2.grad)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_fsdp_sees_one_op():
    """FSDP2 (fully_shard, one CPU rank over gloo): sharded parameters thetas and R get the gradients of
    the unsharded module."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    class Site(torch.nn.Module):
        def __init__(self):
            super().__init__()
            thetas, pairs, R = inputs(16, 20, "random", (3,), (), dtype=torch.float32, seed=15)
            self.thetas, self.R = torch.nn.Parameter(thetas), torch.nn.Parameter(R)
            self.register_buffer("pairs", pairs)

        def forward(self, x):
            return x @ ek.orthogonal_product(self.thetas, self.pairs, self.R)

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sharded, plain = Site(), Site()
        fully_shard(sharded)
        x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(4))
        sharded(x).square().sum().backward()
        plain(x).square().sum().backward()
        torch.testing.assert_close(sharded.thetas.grad.full_tensor(), plain.thetas.grad)
        torch.testing.assert_close(sharded.R.grad.full_tensor(), plain.R.grad)
    finally:
        dist.destroy_process_group()


# -- precision, determinism --------------------------------------------------------------------------


def _roundings(dtype, pairs):
    """Roundings to dtype on the way to M and its gradients. float32: three (two products and a sum)
    per rotation that a row goes through, the rows of the index that most pairs touch. float16 and
    bfloat16 are computed in float32 and rounded once at the end (float32's own error is below a
    thousandth of that rounding's)."""
    if dtype == torch.float32:
        return 3 * int(torch.bincount(pairs.flatten()).max())
    return 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    """thetas and R given in dtype (a low-precision model's parameters) against the float64 reference
    on those same values, the upstream gradient rounded alike."""
    thetas, pairs, R = inputs(64, 200, "random", (3,), (3,), dtype=dtype, seed=7)
    tol = reference.rounding_tolerance(dtype, _roundings(dtype, pairs))
    thetas.requires_grad_(True)
    R.requires_grad_(True)
    M = op(thetas, pairs, R, True)
    assert M.dtype == dtype
    t64, r64 = thetas.detach().double().requires_grad_(True), R.detach().double().requires_grad_(True)
    expected = reference.orthogonal_product(t64, pairs, r64, True)
    assert rel_err(M, expected) < tol
    upstream = torch.randn(M.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = torch.autograd.grad(M, (thetas, R), upstream)
    want = torch.autograd.grad(expected, (t64, r64), upstream.double())
    for g, w, x in zip(got, want, (thetas, R)):
        assert g.dtype == x.dtype
        assert rel_err(g, w) < tol


def test_mixed_dtypes_promote():
    thetas, pairs, R = inputs(16, 10, seed=8)
    M = op(thetas.float(), pairs, R.bfloat16(), True)
    assert M.dtype == torch.float32
    assert rel_err(M, reference.orthogonal_product(thetas.float(), pairs, R.bfloat16(), True)) < 1e-5


def assert_backward_deterministic(thetas, pairs, R):
    """The same gradients, bit for bit, on every run."""
    M = op(thetas, pairs, R, True)
    upstream = torch.randn_like(M)
    first = op_backward(upstream, thetas, pairs, M, True)
    for _ in range(3):
        again = op_backward(upstream, thetas, pairs, M, True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_backward_is_deterministic():
    assert_backward_deterministic(*inputs(64, 500, "random", (8,), (), dtype=torch.float32, seed=9))


# -- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda t, p, r: (t, torch.tensor([[1, 1]] * 3), r), "needs i != j"),
        (lambda t, p, r: (t, torch.tensor([[0, 1], [2, 8], [3, 4]]), r),
         r"pairs\[1\] = \(2, 8\) must index rows 0..7"),
        (lambda t, p, r: (t, torch.tensor([[0, -1]] * 3), r), "must index rows"),
        (lambda t, p, r: (t, p[:2], r), r"pairs must have shape \(N, 2\) with N = .* = 3"),
        (lambda t, p, r: (t, p, r[..., :7]), r"R must have shape \(..., h, h\)"),
        (lambda t, p, r: (t.long(), p, r), "thetas must be a floating-point tensor"),
        (lambda t, p, r: (t, p, r.int()), "R must be a floating-point tensor"),
        (lambda t, p, r: (t, p.float(), r), "pairs must be an int64"),
        (lambda t, p, r: (t.expand(4, 3), p, r.expand(3, 8, 8)), "do not broadcast"),
        (lambda t, p, r: (t, p, torch.randn(300, 300)), "h = 300 is not supported"),
    ],
)
def test_op_rejects_bad_input(change, match):
    thetas, pairs, R = inputs(8, 3, seed=10)
    with pytest.raises(RuntimeError, match=match):
        op(*change(thetas, pairs, R), True)


def test_op_rejects_tensors_on_different_devices():
    thetas, pairs, R = inputs(8, 3, seed=10)
    with pytest.raises((RuntimeError, ValueError), match="device"):
        op(thetas, pairs.to("meta"), R, True)
    with pytest.raises(ValueError, match="one device"):
        ek.orthogonal_product(thetas, pairs.to("meta"), R)


def test_public_function_checks_pairs_once_per_buffer():
    thetas, pairs, R = inputs(8, 3, seed=11)
    ek.orthogonal_product(thetas, pairs, R)
    pairs[0, 1] = pairs[0, 0]  # an in-place change bumps the version: checked again
    with pytest.raises(ValueError, match="needs i != j"):
        ek.orthogonal_product(thetas, pairs, R)


# -- dispatch and build ------------------------------------------------------------------------------


def test_public_function_runs_the_op_on_cpu(monkeypatch):
    monkeypatch.setenv("ECHO_BACKEND", "auto")
    assert backend.use_kernel("orthogonal_product", torch.device("cpu"))
    calls = []
    real = reference.orthogonal_product
    monkeypatch.setattr(reference, "orthogonal_product", lambda *a: calls.append(1) or real(*a))
    thetas, pairs, R = inputs(8, 5, seed=12)
    torch.testing.assert_close(ek.orthogonal_product(thetas, pairs, R), real(thetas, pairs, R))
    assert not calls
    monkeypatch.setenv("ECHO_BACKEND", "reference")
    ek.orthogonal_product(thetas, pairs, R)
    assert calls


def test_missing_extension_is_said_once_and_the_reference_runs(monkeypatch):
    monkeypatch.setenv("ECHO_BACKEND", "auto")
    monkeypatch.setattr(_extension, "_CPU", False)
    monkeypatch.setattr(backend, "_warned", set())
    thetas, pairs, R = inputs(8, 5, seed=13)
    with pytest.warns(UserWarning,
                      match="no compiled orthogonal_product for cpu tensors; running the reference"):
        M = ek.orthogonal_product(thetas, pairs, R)
    torch.testing.assert_close(M, reference.orthogonal_product(thetas, pairs, R))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ek.orthogonal_product(thetas, pairs, R)


def _toolkit_present() -> bool:
    return bool(shutil.which("nvcc") or os.environ.get("CUDA_HOME"))


@pytest.mark.skipif(
    torch.version.cuda is None or not _toolkit_present() or os.environ.get("ECHO_KERNELS_CUDA") == "0",
    reason="torch is a CPU build, no CUDA toolkit here, or ECHO_KERNELS_CUDA=0",
)
def test_cuda_part_was_compiled():
    """With a CUDA build of torch and nvcc present (CI), the build must have compiled the CUDA kernels."""
    assert _extension.has_kernel("orthogonal_product", "CUDA")
    assert _extension.has_kernel("orthogonal_product_backward", "CUDA")


def test_info_reports_backends():
    from echo_kernels import info

    text = info.report()
    assert "orthogonal_product CPU kernel:  yes" in text
    assert f"CPU kernels' threads: {torch.get_num_threads()} of torch's {torch.get_num_threads()}" in text


# -- the CUDA kernel (run by the GPU script) ---------------------------------------------------------

GPU_CASES = [
    (16, 120, "all", (3,), (3,)),
    (64, 32, "adjacent", (88,), (88,)),
    (64, 200, "random", (2, 1), (1, 3)),
    (100, 300, "disjoint", (5,), ()),
    (128, 8128, "all", (2,), (2,)),
    (256, 1000, "random", (3,), (3,)),
    # about the kernel's 64-step tiles, each read while the one before it is applied
    *[(32, n, "random", (2,), (2,)) for n in (63, 64, 65, 128, 129)],
]


@pytest.mark.gpu
@pytest.mark.parametrize("h,n,kind,tb,rb", GPU_CASES)
@pytest.mark.parametrize("givens_first", [True, False], ids=["GR", "RG"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gpu_cuda_matches_reference(h, n, kind, tb, rb, givens_first, dtype):
    thetas, pairs, R = inputs(h, n, kind, tb, rb, dtype=dtype, seed=n)
    ref_in = [x.clone().requires_grad_(True) for x in (thetas, R)]
    gpu_in = [x.cuda().requires_grad_(True) for x in (thetas, R)]
    M = op(gpu_in[0], pairs.cuda(), gpu_in[1], givens_first)
    # the CPU op, itself checked against the reference
    expected = op(ref_in[0], pairs, ref_in[1], givens_first)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert rel_err(M.cpu(), expected) < tol
    upstream = torch.randn(M.shape, dtype=dtype, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(M, gpu_in, upstream.cuda())
    want = torch.autograd.grad(expected, ref_in, upstream)
    for g, w in zip(got, want):
        assert rel_err(g.cpu(), w) < (1e-9 if dtype == torch.float64 else 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_half_precision(dtype):
    thetas, pairs, R = inputs(64, 200, "random", (4,), (4,), dtype=dtype, seed=13)
    M = op(thetas.cuda(), pairs.cuda(), R.cuda(), True)
    assert M.dtype == dtype
    expected = reference.orthogonal_product(thetas.double(), pairs, R.double(), True)
    assert rel_err(M.cpu(), expected) < reference.rounding_tolerance(dtype, _roundings(dtype, pairs))


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    assert_backward_deterministic(
        *inputs(128, 2000, "random", (16,), (16,), dtype=torch.float32, seed=14, device="cuda"))


def test_wider_than_the_compiled_op_runs_the_reference_and_says_so(monkeypatch):
    from echo_kernels import orthogonal

    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.setenv("ECHO_BACKEND", "auto")
    h = orthogonal.MAX_H + 2
    g = torch.Generator().manual_seed(3)
    thetas, R = torch.randn(4, generator=g), torch.randn(h, h, generator=g)
    pairs = make_pairs("random", h, 4, g)
    with pytest.warns(UserWarning,
                      match=rf"takes h <= {orthogonal.MAX_H}; h = {h} runs the reference") as caught:
        M = ek.orthogonal_product(thetas, pairs, R)
    assert caught[0].filename == __file__  # the warning points at the caller
    torch.testing.assert_close(M, reference.orthogonal_product(thetas, pairs, R), rtol=0, atol=0)
