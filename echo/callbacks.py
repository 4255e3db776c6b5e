"""AdaptiveBaseCallback: Echo's adaptive rotary base (docs/model.md, Adaptive base) under transformers'
Trainer.

    trainer = Seq2SeqTrainer(model=model, args=args, ..., callbacks=[AdaptiveBaseCallback()])

Without it, every training forward moves the base: once per micro-batch under gradient accumulation,
and by each process's own loss under DDP / FSDP, so the processes' bases drift apart.
"""

from __future__ import annotations

from torch import nn
from transformers import TrainerCallback

from .model import Echo


class AdaptiveBaseCallback(TrainerCallback):
    """Moves the base once per optimizer step, from the mean token loss of that step's micro-batches
    on all processes (the loss the Trainer logs), identically on every process.

    While training, forward only adds its loss to the model's `step_loss` on the device; on_step_end
    calls `Echo.step_base()`. The base follows Echo's own loss: labels must reach forward, so a loss
    computed outside the model (label_smoothing_factor, compute_loss_func) is refused.
    """

    def __init__(self):
        self._echo: Echo | None = None
        self._checked = False

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs):
        echo = _find_echo(model)
        if not echo.config.adaptive_base:
            self._echo = None
            return
        if args.label_smoothing_factor:
            raise ValueError("AdaptiveBaseCallback: with label_smoothing_factor the Trainer computes the "
                             "loss outside Echo, which never sees it; set adaptive_base=False in the config")
        self._echo, self._checked = echo, False
        echo.defer_base_updates()

    def on_step_end(self, args, state, control, **kwargs):
        if self._echo is None:
            return
        if not self._checked:  # once: the only host sync of the callback
            if self._echo.step_loss[2].item() == 0:
                raise RuntimeError("AdaptiveBaseCallback: no training forward of Echo received labels in "
                                   "this optimizer step, so the adaptive base has no loss to follow (a "
                                   "compute_loss_func or a custom compute_loss keeps labels from the model)")
            self._checked = True
        self._echo.step_base()

    def on_train_end(self, args, state, control, **kwargs):
        if self._echo is not None:
            self._echo.defer_base_updates(False)
            self._echo = None


def _find_echo(model: nn.Module | None) -> Echo:
    """The Echo inside whatever wraps it (FSDP, PEFT, ...)."""
    found = next((m for m in model.modules() if isinstance(m, Echo)), None) if model is not None else None
    if found is None:
        raise TypeError(f"AdaptiveBaseCallback trains echo.Echo models, got {type(model).__name__}")
    return found
