"""Weight resolution (path -> cache -> download -> clear error), loading errors and random weights."""

import functools
import http.server
import socket
import threading
from pathlib import Path

import pytest
import torch

from dinov2_patched import WeightsLoadError, WeightsNotFoundError, build_model, weights_fingerprint

NAME, FILE, URL_PATH = "dino_vits16", "dino_deitsmall16_pretrain.pth", "dino/dino_deitsmall16_pretrain"


@pytest.fixture
def hub_home(tmp_path, monkeypatch) -> Path:
    """An empty torch hub home; returns its checkpoint folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def official_state() -> dict[str, torch.Tensor]:
    """A random dino_vits16 state dict in the official layout (taken from our own random model)."""
    return build_model(NAME, weights="none").state_dict()


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_download_from_base_url_into_cache(tmp_path, hub_home, monkeypatch, official_state):
    served = tmp_path / "server" / URL_PATH
    served.mkdir(parents=True)
    torch.save(official_state, served / FILE)
    handler = functools.partial(QuietHandler, directory=str(tmp_path / "server"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("DINO_WEIGHTS_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
        model = build_model(NAME, progress=False)
    finally:
        server.shutdown()
        server.server_close()
    assert sorted(p.name for p in hub_home.iterdir()) == [FILE]  # no temporary file left behind
    assert model.weights_id == weights_fingerprint(hub_home / FILE) == weights_fingerprint(served / FILE)
    for key, value in model.state_dict().items():
        assert torch.equal(value, official_state[key]), key


def test_cache_is_used_before_any_download(hub_home, monkeypatch, official_state):
    hub_home.mkdir(parents=True)
    torch.save(official_state, hub_home / FILE)
    monkeypatch.setenv("DINO_WEIGHTS_BASE_URL", f"http://127.0.0.1:{unused_port()}")
    assert build_model(NAME, progress=False).weights_id == weights_fingerprint(hub_home / FILE)


def test_unreachable_server_gives_clear_error(hub_home, monkeypatch):
    url = f"http://127.0.0.1:{unused_port()}"
    monkeypatch.setenv("DINO_WEIGHTS_BASE_URL", url)
    with pytest.raises(WeightsNotFoundError) as info:
        build_model("dinov2_vits14_reg", progress=False)
    message = str(info.value)
    assert "dinov2_vits14_reg4_pretrain.pth" in message
    assert f"{url}/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth" in message
    assert f"put it in {hub_home}/" in message
    assert isinstance(info.value, FileNotFoundError)
    assert not hub_home.exists() or not any(hub_home.iterdir())


class CutOffHandler(http.server.BaseHTTPRequestHandler):
    """Promises 1000 bytes, sends 10, hangs up."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"0123456789")
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


def test_interrupted_download_leaves_nothing_in_cache(hub_home, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CutOffHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("DINO_WEIGHTS_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(WeightsNotFoundError, match=f"put it in {hub_home}/"):
            build_model(NAME, progress=False)
    finally:
        server.shutdown()
        server.server_close()
    assert not any(hub_home.iterdir())  # neither the file nor a temporary leftover


def test_missing_explicit_path(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="nope.pth for dino_vits16 does not exist"):
        build_model(NAME, weights=tmp_path / "nope.pth")


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 384), "pos_embed": torch.zeros(1, 197, 384)}, path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(WeightsLoadError, match="cut.pth is corrupt or truncated .*delete it and download again"):
        build_model(NAME, weights=path)


def test_a_crafted_weight_file_runs_nothing_and_the_error_names_it(crafted_file, official_state):
    """A weight file whose unpickling would run code (any pickle format torch.load reads) is refused unrun."""
    crafted = crafted_file("evil.pth", dict(official_state))
    with pytest.raises(WeightsLoadError, match="weights_only=True refuses") as err:
        build_model(NAME, weights=crafted.path)
    message = str(err.value)
    assert str(crafted.path) in message and ("getattr" in message or "eval" in message) and "\n" not in message
    assert not crafted.marker.exists()


def test_wrong_architecture_names_keys(tmp_path):
    path = tmp_path / "other.pth"
    wrong = {"cls_token": torch.zeros(1, 1, 384), "pos_embed": torch.zeros(1, 197, 384), "extra": torch.zeros(1)}
    torch.save(wrong, path)
    with pytest.raises(WeightsLoadError) as info:
        build_model("dinov2_vits14", weights=path)
    message = str(info.value)
    assert "does not match the architecture of dinov2_vits14" in message
    assert "missing keys mask_token, patch_embed.proj.weight, patch_embed.proj.bias and " in message
    assert "unexpected keys extra" in message
    assert "pos_embed (1, 197, 384) vs (1, 1370, 384)" in message


def test_unknown_name_lists_known_names():
    known = r"Unknown model name 'dinov3_vits16'; known names: dinov2_vits14, .*dino_vitb8"
    with pytest.raises(ValueError, match=known):
        build_model("dinov3_vits16", weights="none")


def test_random_weights_are_deterministic_and_leave_global_rng_alone(official_state):
    torch.manual_seed(1234)  # `official_state` was built from another global RNG state
    state = torch.get_rng_state()
    model = build_model(NAME, weights="none")
    assert torch.equal(state, torch.get_rng_state())
    assert model.weights_id == "random-seed0"
    for key, value in model.state_dict().items():
        assert torch.equal(value, official_state[key]), key
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.2)


def test_fingerprint_follows_content(tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save({"w": torch.zeros(3)}, a)
    torch.save({"w": torch.ones(3)}, b)
    assert weights_fingerprint(a) != weights_fingerprint(b)
    assert weights_fingerprint(a) == weights_fingerprint(str(a))
