"""transformers-astra: ASTRA multi-device inference for Hugging Face Transformers.

    import transformers_astra as astra
    astra.patch(model, astra.AstraConfig(num_devices=4, groups=32))

Importing it registers ``quant_method="astra"`` with transformers' quantization registry, so that
``AutoModelFor....from_pretrained`` and ``pipeline(...)`` load saved ASTRA checkpoints as patched models.
"""

from .callback import AstraNAQCallback
from .calibration import calibrate, collect_activations
from .config import AstraConfig
from .distributed import DistributedRuntime, LoopbackTransport, Timings, Traffic
from .generation import GenerationStats
from .hf_quantizer import AstraHfQuantizer
from .hf_quantizer import register as _register_quantizer
from .hub import from_pretrained, push_to_hub, save_pretrained
from .modelcard import create_model_card
from .planner import DeviceProfile, LinkModel, Plan, Prediction, balanced_shard_sizes, calibrate_device, plan
from .patch import auxiliary_loss, capture_codes, full_precision, is_patched, patch, quantizers, unpatch
from .quantization_config import AstraQuantizationConfig
from .quantizer import GroupedVQ
from .random_shards import RandomShardsCallback, set_shards
from .sharding import ShardLayout, split_sizes

__version__ = "0.1.0"

_register_quantizer()

__all__ = [
    "AstraNAQCallback",
    "AstraConfig",
    "AstraHfQuantizer",
    "AstraQuantizationConfig",
    "DeviceProfile",
    "DistributedRuntime",
    "GenerationStats",
    "GroupedVQ",
    "LinkModel",
    "LoopbackTransport",
    "Plan",
    "Prediction",
    "RandomShardsCallback",
    "ShardLayout",
    "Timings",
    "Traffic",
    "auxiliary_loss",
    "balanced_shard_sizes",
    "calibrate_device",
    "calibrate",
    "capture_codes",
    "collect_activations",
    "create_model_card",
    "from_pretrained",
    "full_precision",
    "is_patched",
    "patch",
    "plan",
    "push_to_hub",
    "quantizers",
    "save_pretrained",
    "set_shards",
    "split_sizes",
    "unpatch",
]
