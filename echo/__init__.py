"""echo: the Echo speech model (docs/model.md) on the ops of echo_kernels.

    from echo import Echo, EchoConfig
    from echo import AdaptiveBaseCallback   # for transformers' Trainer: callbacks=[AdaptiveBaseCallback()]
    from echo import EchoProcessor          # after `import echo`, AutoProcessor.from_pretrained loads it
"""

from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForSpeechSeq2Seq, AutoProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES

from .cache import EchoCache
from .callbacks import AdaptiveBaseCallback
from .config import EchoConfig
from .model import Echo
from .processor import EchoFeatureExtractor, EchoProcessor

AutoConfig.register("echo", EchoConfig, exist_ok=True)
AutoModel.register(EchoConfig, Echo, exist_ok=True)
AutoModelForSpeechSeq2Seq.register(EchoConfig, Echo, exist_ok=True)
AutoFeatureExtractor.register(EchoConfig, EchoFeatureExtractor, exist_ok=True)
AutoProcessor.register(EchoConfig, EchoProcessor, exist_ok=True)
# The "automatic-speech-recognition" pipeline decodes with model.generate only for the classes this table
# names (a registered class is not looked up there); without it the pipeline would take Echo for a CTC model.
MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES.setdefault("echo", "Echo")

__all__ = ["AdaptiveBaseCallback", "Echo", "EchoCache", "EchoConfig", "EchoFeatureExtractor", "EchoProcessor"]
