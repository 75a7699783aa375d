"""`build_model`: a model by name with official, local or random weights."""

import os

from dinov2_patched.init import RANDOM_WEIGHTS_ID, init_random_weights
from dinov2_patched.models import create_model
from dinov2_patched.vision_transformer import VisionTransformer
from dinov2_patched.weights import check_architecture, read_state_dict, resolve_weights, weights_fingerprint


def build_model(
    name: str, weights: str | os.PathLike | None = None, *, base_url: str | None = None, progress: bool = True
) -> VisionTransformer:
    """The model `name` (see MODEL_NAMES) in eval mode on the CPU.

    weights: None -> the official file (torch hub cache, else downloaded from `base_url` /
    $DINO_WEIGHTS_BASE_URL / https://dl.fbaipublicfiles.com); "none" -> deterministic random weights
    (seed 0, the global RNG is neither used nor advanced); a path -> that file, loaded strictly.
    Raises ValueError for an unknown name, WeightsNotFoundError when no file is found or downloadable,
    WeightsLoadError when the file is corrupt or belongs to another architecture.
    """
    if isinstance(weights, str) and weights.lower() == "none":
        model = create_model(name, device="cpu")
        init_random_weights(model, seed=0)
        model.weights_id = RANDOM_WEIGHTS_ID
        return model.eval()
    model = create_model(name, device="meta")  # parameters come from the file: never allocate them twice
    path = resolve_weights(name, weights, base_url, progress)
    state = read_state_dict(path)
    check_architecture(state, model, path, name)
    state = {key: value.float() if value.is_floating_point() else value for key, value in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.weights_id = weights_fingerprint(path)
    return model.eval()
