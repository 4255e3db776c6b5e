"""echo: the Echo speech model (docs/model.md) on the ops of echo_kernels.

    from echo import Echo, EchoConfig
    from echo import AdaptiveBaseCallback   # pass it to transformers' Trainer: callbacks=[AdaptiveBaseCallback()]
"""

from transformers import AutoConfig, AutoModel, AutoModelForSpeechSeq2Seq

from .cache import EchoCache
from .callbacks import AdaptiveBaseCallback
from .config import EchoConfig
from .model import Echo

AutoConfig.register("echo", EchoConfig, exist_ok=True)
AutoModel.register(EchoConfig, Echo, exist_ok=True)
AutoModelForSpeechSeq2Seq.register(EchoConfig, Echo, exist_ok=True)

__all__ = ["AdaptiveBaseCallback", "Echo", "EchoCache", "EchoConfig"]
