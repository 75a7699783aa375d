"""Our implementation of the DINOv2 and DINO v1 vision transformers; loads the official checkpoints unchanged.

    from dinov2_patched import build_model
    model = build_model("dinov2_vits14")            # official weights (cache, else download)
    feats = model.get_intermediate_layers(images, n=1, reshape=True)[0]   # (B, C, H/14, W/14)
"""

from dinov2_patched.build import build_model
from dinov2_patched.init import RANDOM_WEIGHTS_ID
from dinov2_patched.models import MODEL_NAMES, create_model, model_spec
from dinov2_patched.vision_transformer import VisionTransformer
from dinov2_patched.weights import WeightsLoadError, WeightsNotFoundError, weights_fingerprint

__all__ = [
    "MODEL_NAMES",
    "RANDOM_WEIGHTS_ID",
    "VisionTransformer",
    "WeightsLoadError",
    "WeightsNotFoundError",
    "build_model",
    "create_model",
    "model_spec",
    "weights_fingerprint",
]
