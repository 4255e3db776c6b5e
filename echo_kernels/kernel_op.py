"""KernelOp: the one template every op of the package is registered with.

An op is one forward and one backward launcher. KernelOp makes them reachable three ways, cheapest
first, and the op's `__call__` picks:

- eager, no gradient wanted: the forward launcher itself, nothing around it;
- eager, with gradients: a `torch.autograd.Function` straight onto the launchers (a few microseconds,
  where the dispatcher's Python autograd costs tens);
- under torch.compile, or called as `torch.ops.echo_kernels.<name>`: the op with its fake and its
  autograd, so that graphs see through it; its backward is the op `echo_kernels::<name>_backward`.

The launchers follow one convention:

    forward(*inputs) -> output, or a tuple whose first entry is the differentiable output (the others,
        e.g. a log-sum-exp kept for the backward, are not differentiable);
    backward(grad, *inputs, *outputs if save_outputs) -> one gradient per name in `differentiable`, in
        that order; where that input is None the gradient is any placeholder (an op cannot return None).

Here the gradients are summed over the dims an input was broadcast along and cast to its dtype, and both
launchers run with their tensors' CUDA device current (`on_the_tensors_device`).
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Sequence

import torch
from torch import Tensor


class KernelOp:
    """`echo_kernels::<name>` and its backward, with fakes and autograd, plus the eager fast path.

    forward, backward: the launchers (annotated: their signatures are the ops' schemas), or, for ops the
    compiled extension defines (`defined_by_extension`), Python functions calling those ops.
    forward_fake, backward_fake: output shapes and dtypes of the two ops, for tracing.
    differentiable: names of the inputs that get gradients; save_outputs: the backward needs the outputs.
    """

    def __init__(self, name: str, forward: Callable, backward: Callable, *, forward_fake: Callable,
                 backward_fake: Callable, differentiable: Sequence[str], save_outputs: bool = False,
                 defined_by_extension: bool = False):
        qualname = f"echo_kernels::{name}"
        forward, backward = on_the_tensors_device(forward), on_the_tensors_device(backward)
        self.forward = forward
        self.input_names = tuple(inspect.signature(forward).parameters)
        unknown = set(differentiable) - set(self.input_names)
        if unknown:
            raise ValueError(f"{name}: differentiable names {sorted(unknown)} are not inputs of the forward")
        self.differentiable = tuple(differentiable)
        self.save_outputs = save_outputs
        if defined_by_extension:
            self.op = getattr(torch.ops.echo_kernels, name)
            self.backward_op = backward  # calls the extension's backward op itself
        else:
            self.op = torch.library.custom_op(qualname, forward, mutates_args=())
            self.backward_op = torch.library.custom_op(f"{qualname}_backward", backward, mutates_args=())
        self.backward = backward
        torch.library.register_fake(qualname, forward_fake)
        torch.library.register_fake(f"{qualname}_backward", backward_fake)
        torch.library.register_autograd(qualname, self._op_backward, setup_context=self._setup_context)

    def __call__(self, *inputs):
        """The op's outputs for `inputs` (the forward's positional arguments), by the cheapest way in."""
        if torch.compiler.is_compiling():
            return self.op(*inputs)
        if torch.is_grad_enabled() and any(isinstance(x, Tensor) and x.requires_grad for x in inputs):
            return _EagerKernelOp.apply(self, *inputs)
        return self.forward(*inputs)

    # -- what both autograd paths share ----------------------------------------------------------

    def save(self, ctx, inputs: tuple, outputs) -> None:
        """Tensors through save_for_backward, everything else (None too) on ctx, in their places."""
        kept = (*inputs, *_as_tuple(outputs)) if self.save_outputs else tuple(inputs)
        ctx.save_for_backward(*(x for x in kept if isinstance(x, Tensor)))
        ctx.constants = tuple(_SAVED if isinstance(x, Tensor) else x for x in kept)
        if isinstance(outputs, tuple):
            ctx.mark_non_differentiable(*outputs[1:])

    def gradients(self, ctx, grad: Tensor, launch: Callable, needs_input_grad: Sequence[bool]) -> list:
        """One gradient (or None) per input, from launch(grad, *saved)."""
        tensors = iter(ctx.saved_tensors)
        saved = [next(tensors) if c is _SAVED else c for c in ctx.constants]
        raw = dict(zip(self.differentiable, launch(grad, *saved)))
        grads = []
        for name, x, needed in zip(self.input_names, saved, needs_input_grad):
            g = raw.get(name)
            grads.append(g.sum_to_size(x.shape).to(x.dtype) if g is not None and x is not None and needed
                         else None)
        return grads

    def _setup_context(self, ctx, inputs, output):
        self.save(ctx, inputs, output)

    def _op_backward(self, ctx, grad, *_):
        return tuple(self.gradients(ctx, grad, self.backward_op, ctx.needs_input_grad))


_SAVED = object()  # marks, among the constants, the places of the saved tensors


def on_the_tensors_device(launcher: Callable) -> Callable:
    """launcher, run with the CUDA device of its first tensor argument current. Triton launches a kernel
    on the current device whatever its tensors', and a model spread over GPUs (`device_map="auto"`) calls
    each layer with its own GPU's tensors, whichever device is current."""

    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        first = next((x for x in (*args, *kwargs.values()) if isinstance(x, Tensor)), None)
        if first is None or not first.is_cuda:
            return launcher(*args, **kwargs)
        with torch.cuda.device(first.device):
            return launcher(*args, **kwargs)

    # the op's schema is read from this signature: its annotations evaluated where the launcher was written
    launch.__signature__ = inspect.signature(launcher, eval_str=True)
    return launch


def _as_tuple(outputs) -> tuple:
    return outputs if isinstance(outputs, tuple) else (outputs,)


class _EagerKernelOp(torch.autograd.Function):
    """Eager autograd straight onto a KernelOp's launchers (its first argument)."""

    @staticmethod
    def forward(ctx, kernel_op: KernelOp, *inputs):
        outputs = kernel_op.forward(*inputs)
        kernel_op.save(ctx, inputs, outputs)
        ctx.kernel_op = kernel_op
        return outputs

    @staticmethod
    def backward(ctx, grad, *_):
        kernel_op = ctx.kernel_op
        return None, *kernel_op.gradients(ctx, grad, kernel_op.backward, ctx.needs_input_grad[1:])
