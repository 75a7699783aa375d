"""The evaluator's linear probe: one recipe for every method's code, seeded, equal to the spatial objective."""

import numpy as np
import torch
import torch.nn.functional as F

from shared.probes import ProbeRecipe, _sample_code, fit_evaluator_probe


def test_sampled_code_equals_upsampled_code_at_the_sampled_pixels():
    """Because the probe is linear, probe(bilinear-upsampled code) = bilinear-upsampled probe(code): sampling the
    code at label pixels with grid_sample must equal F.interpolate(code) read at those pixels."""
    generator = torch.Generator().manual_seed(0)
    code = torch.randn(5, 3, 4, generator=generator)
    labels = torch.randint(-1, 3, (9, 12), generator=generator)
    vectors, targets = _sample_code(code, labels, 20, 3, torch.Generator().manual_seed(1))
    up = F.interpolate(code[None], size=(9, 12), mode="bilinear", align_corners=False)[0]  # (5, 9, 12)
    valid = ((labels >= 0) & (labels < 3)).flatten().nonzero().squeeze(1)
    chosen = valid[torch.randperm(len(valid), generator=torch.Generator().manual_seed(1))[:20]]
    expected = up.reshape(5, -1)[:, chosen].T
    torch.testing.assert_close(vectors, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(targets, labels.flatten()[chosen])


def test_probe_separates_linearly_separable_codes_and_is_deterministic():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(6, 8, 8)).astype(np.int16)
    labels[0, :2] = -1  # ignored pixels
    centres = np.eye(3, 5, dtype=np.float32) * 4
    features = centres[np.clip(labels, 0, 2)].transpose(0, 3, 1, 2)  # (6, 5, 8, 8): code = class centre
    features = features + rng.normal(scale=0.1, size=features.shape).astype(np.float32)
    recipe = ProbeRecipe(max_images=6, pixels_per_image=64, steps=200, batch_size=256)
    probe = fit_evaluator_probe(lambda x: x, features, labels, 3, recipe)
    again = fit_evaluator_probe(lambda x: x, features, labels, 3, recipe)
    assert torch.equal(probe.conv.weight, again.conv.weight)
    with torch.no_grad():
        pred = probe(torch.from_numpy(features)).argmax(1).numpy()
    valid = labels >= 0
    assert (pred[valid] == labels[valid]).mean() == 1.0
    state = torch.get_rng_state()
    fit_evaluator_probe(lambda x: x, features, labels, 3, recipe)
    assert torch.equal(state, torch.get_rng_state())  # its own generators: the global stream is untouched
