"""The hub path: fail fast and clearly when the hub is out of reach, fetch only the files the loaders
need, and turn the aesthetic head's .pth into safetensors without unpickling anything but tensors.

No test here reaches the network: offline mode, a closed local port, a local stub server and a fake
snapshot_download stand in for the hub.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

import huggingface_hub
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import filter_repo_objects

from conceptbench.metrics.aesthetic import AestheticMLP, load_aesthetic
from conceptbench import hub
from conceptbench.data_hub import fetch_dataset
from conceptbench.hub import HubContentError, HubUnavailable
from conceptbench.models import hub as model_hub
from conceptbench.models.hub import convert_aesthetic, fetch_model

DINO = {"kind": "dinov2", "repo": "facebook/dinov2-small", "revision": "150c8e7bb7cef2d30ec31b13a517af14840ee3f7"}
SD15 = {
    "kind": "diffusion",
    "repo": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "revision": "451f4fe16113bff5a5d2269ed5ad43b0592e9a14",
}
AESTHETIC = {
    "kind": "aesthetic",
    "repo": "camenduru/improved-aesthetic-predictor",
    "revision": "0" * 40,  # stand-in: the fake hub below does not check it
    "filename": "sac+logos+ava1-l14-linearMSE.pth",
}
DOGS = {"kind": "subject", "repo": "diffusers/dog-example", "revision": "7aac740a23542bde4c568131b815a9ed08a7e192"}


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def online(monkeypatch):
    """huggingface_hub believes it is online (the network calls are then redirected per test)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


# ----------------------------------------------------------------------------- failing fast


def test_offline_fetch_model_fails_at_once_naming_model_repo_and_fix(offline, tmp_path):
    out = tmp_path / "models" / "dino"
    start = time.monotonic()
    with pytest.raises(HubUnavailable) as err:
        fetch_model("dino", DINO, out)
    assert time.monotonic() - start < 5
    e = err.value
    assert isinstance(e, RuntimeError)
    msg = str(e)
    assert "'dino'" in msg and DINO["repo"] in msg and DINO["revision"] in msg
    assert "offline" in msg.lower()
    assert f"hf download {DINO['repo']} --revision {DINO['revision']}" in msg
    assert "--local-dir DIR" in msg and "`path: DIR`" in msg
    # The command fetches just the files the loader needs.
    assert "--include config.json --include model.safetensors" in msg
    assert (e.name, e.repo, e.revision) == ("dino", DINO["repo"], DINO["revision"])
    assert not out.exists() and _leftovers(out.parent) == []


def test_offline_fetch_dataset_names_the_dataset_repo_type(offline, tmp_path):
    with pytest.raises(HubUnavailable) as err:
        fetch_dataset("dogs", DOGS, tmp_path / "dogs")
    msg = str(err.value)
    assert msg.startswith("dataset 'dogs' (repo diffusers/dog-example, revision 7aac740a")
    assert "--repo-type dataset" in msg
    assert not (tmp_path / "dogs").exists()


def test_offline_aesthetic_message_says_how_to_convert(offline, tmp_path):
    with pytest.raises(HubUnavailable) as err:
        fetch_model("aesthetic", AESTHETIC, tmp_path / "aes")
    msg = str(err.value)
    assert "--include sac+logos+ava1-l14-linearMSE.pth" in msg
    assert "python -m conceptbench.models.hub convert-aesthetic" in msg


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_fails_fast_without_retry_loop(online, monkeypatch, tmp_path):
    # snapshot_download alone retries a refused connection 5 times (about 23 s); the preflight does not.
    monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    start = time.monotonic()
    with pytest.raises(HubUnavailable) as err:
        fetch_model("dino", DINO, tmp_path / "dino", timeout=2)
    assert time.monotonic() - start < 5
    assert "cannot be reached" in str(err.value) and "ConnectError" in str(err.value)
    assert "\n" not in err.value.reason  # the reason is one line


class _StubHub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the hub does for an unknown revision or repo."""

    error_code = "RevisionNotFound"

    def do_GET(self):  # noqa: N802 (http.server's naming)
        body = json.dumps({"error": "stub"}).encode()
        self.send_response(404)
        self.send_header("X-Error-Code", self.error_code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_hub(online, monkeypatch):
    def start(error_code):
        handler = type("Handler", (_StubHub,), {"error_code": error_code})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        servers.append(server)

    servers = []
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_missing_revision_is_hub_unavailable(stub_hub, tmp_path):
    stub_hub("RevisionNotFound")
    with pytest.raises(HubUnavailable) as err:
        fetch_model("sd15", SD15, tmp_path / "sd15")
    assert f"revision {SD15['revision']} does not exist in model repo {SD15['repo']}" in str(err.value)
    assert not (tmp_path / "sd15").exists()


def test_unknown_repo_is_hub_unavailable(stub_hub, tmp_path):
    stub_hub("RepoNotFound")
    with pytest.raises(HubUnavailable, match="not found"):
        fetch_dataset("dogs", DOGS, tmp_path / "dogs")


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"kind": "dinov2", "repo": "facebook/dinov2-small"}, "revision"),
        ({"kind": "dinov2", "revision": "a" * 40}, "repo"),
        ({"kind": "vae", "repo": "x/y", "revision": "a" * 40}, "kind"),
        ({**DINO, "trust_remote_code": True}, "trust_remote_code"),
    ],
)
def test_bad_specs_are_refused_before_any_network_call(offline, tmp_path, spec, match):
    with pytest.raises(ValueError, match=match):
        fetch_model("m", spec, tmp_path / "m")


# ----------------------------------------------------------------------------- fetching (fake hub)

# An illustrative SD v1.5 repo listing: the diffusers folders with fp32, fp16 and .bin weights,
# the safety checker, and the single-file checkpoints at the root.
SD15_FILES = [
    ".gitattributes", "README.md", "model_index.json",
    "v1-5-pruned-emaonly.safetensors", "v1-5-pruned-emaonly.ckpt", "v1-5-pruned.ckpt", "v1-inference.yaml",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json", "safety_checker/model.safetensors", "safety_checker/model.fp16.safetensors",
    "safety_checker/pytorch_model.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.non_ema.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.bin",
]
SD15_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "requires_safety_checker": True,
}


class FakeHub:
    """Stands in for preflight + snapshot_download, filtering with huggingface_hub's own matcher."""

    def __init__(self, monkeypatch, files: dict[str, bytes], sizes: dict[str, int] | None = None, fail=None):
        self.files, self.sizes, self.fail, self.calls = files, sizes or {}, fail, []
        monkeypatch.setattr(hub, "preflight", lambda repo, revision, repo_type="model", timeout=0: "c" * 40)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)

    def snapshot_download(self, repo_id, *, repo_type, revision, cache_dir, local_dir, allow_patterns,
                          ignore_patterns, dry_run=False):
        self.calls.append(dict(repo_id=repo_id, repo_type=repo_type, revision=revision, dry_run=dry_run,
                               allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        chosen = list(filter_repo_objects(self.files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        if dry_run:
            return [
                huggingface_hub.DryRunFileInfo(
                    commit_hash=revision, file_size=self.sizes.get(f, len(self.files[f])), filename=f,
                    local_path=str(Path(local_dir) / f), is_cached=False, will_download=True,
                )
                for f in chosen
            ]
        if self.fail:
            raise self.fail
        for f in chosen:
            dest = Path(local_dir) / f
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(self.files[f])
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True, exist_ok=True)  # as the real one does
        return str(local_dir)


def _sd15_files() -> dict[str, bytes]:
    files = {f: f.encode() for f in SD15_FILES}
    files["model_index.json"] = json.dumps(SD15_MODEL_INDEX).encode()
    return files


def test_diffusion_fetch_takes_fp32_diffusers_files_only(online, monkeypatch, tmp_path):
    fake = FakeHub(monkeypatch, _sd15_files())
    out = fetch_model("sd15", SD15, tmp_path / "models" / "sd15")
    got = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert got == sorted(model_hub.REQUIRED_FILES["diffusion"] + [
        "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", hub.SOURCE_FILE,
    ])
    assert all(c["revision"] == "c" * 40 for c in fake.calls)  # the resolved commit, not a branch
    assert [c["dry_run"] for c in fake.calls] == [True, False]
    index = json.loads((out / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    source = json.loads((out / hub.SOURCE_FILE).read_text())
    assert source["repo"] == SD15["repo"] and source["revision"] == SD15["revision"]
    assert source["commit"] == "c" * 40 and sorted(source["model_index_nulled"]) == ["feature_extractor", "safety_checker"]
    assert _leftovers(out.parent) == ["sd15"]


def test_revision_without_needed_files_is_refused_and_leaves_nothing(online, monkeypatch, tmp_path):
    files = {f: b"x" for f in SD15_FILES if "unet/diffusion_pytorch_model.safetensors" != f}
    files["model_index.json"] = json.dumps(SD15_MODEL_INDEX).encode()
    FakeHub(monkeypatch, files)
    with pytest.raises(HubContentError, match="unet/diffusion_pytorch_model.safetensors"):
        fetch_model("sd15", SD15, tmp_path / "sd15")
    assert _leftovers(tmp_path) == []


def test_oversized_download_is_refused_before_downloading(online, monkeypatch, tmp_path):
    fake = FakeHub(monkeypatch, {"cc12m-train-0000.tar": b"t", "cc12m-train-0001.tar": b"t"},
                   sizes={"cc12m-train-0000.tar": 2**40, "cc12m-train-0001.tar": 2**40})
    spec = {"kind": "captions", "repo": "pixparse/cc12m-wds", "revision": "d" * 40}
    with pytest.raises(HubContentError, match="GiB"):
        fetch_dataset("cc12m", spec, tmp_path / "cc12m")
    assert [c["dry_run"] for c in fake.calls] == [True]
    out = fetch_dataset("cc12m", {**spec, "allow_patterns": ["cc12m-train-0000.tar"]}, tmp_path / "cc12m",
                        max_bytes=2**41)
    assert sorted(p.name for p in out.iterdir()) == ["cc12m-train-0000.tar", hub.SOURCE_FILE]


def test_dataset_fetch_keeps_repo_layout_without_gitattributes(online, monkeypatch, tmp_path):
    fake = FakeHub(monkeypatch, {".gitattributes": b"*", "alvan-nee-1.jpeg": b"j", "sub/b.jpeg": b"j"})
    out = fetch_dataset("dogs", DOGS, tmp_path / "dogs")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "alvan-nee-1.jpeg", hub.SOURCE_FILE, "sub/b.jpeg",
    ]
    assert fake.calls[-1]["repo_type"] == "dataset"


def test_network_failure_mid_download_is_hub_unavailable(online, monkeypatch, tmp_path):
    import httpx2

    FakeHub(monkeypatch, _sd15_files(), fail=httpx2.ReadTimeout("read timed out"))
    with pytest.raises(HubUnavailable, match="ReadTimeout"):
        fetch_model("sd15", SD15, tmp_path / "sd15")
    assert _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- aesthetic head


def _laion_like_pth(path: Path, seed: int = 0) -> AestheticMLP:
    torch.manual_seed(seed)
    model = AestheticMLP()  # the real shapes: 768 -> 1024 -> 128 -> 64 -> 16 -> 1
    torch.save(model.state_dict(), path)
    return model.eval()


def test_aesthetic_pth_converts_to_a_folder_load_aesthetic_reads(tmp_path):
    model = _laion_like_pth(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    out = convert_aesthetic(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", tmp_path / "aes")
    assert json.loads((out / "config.json").read_text()) == {"in_dim": 768, "hidden": [1024, 128, 64, 16]}
    loaded = load_aesthetic(out)
    emb = torch.nn.functional.normalize(torch.randn(8, 768), dim=-1)
    with torch.no_grad():
        assert torch.equal(loaded(emb), model(emb))


def test_aesthetic_fetch_downloads_the_pth_and_converts_it(online, monkeypatch, tmp_path):
    model = _laion_like_pth(tmp_path / "head.pth")
    raw = (tmp_path / "head.pth").read_bytes()
    fake = FakeHub(monkeypatch, {AESTHETIC["filename"]: raw, "README.md": b"r", "other.pth": b"o"})
    digest = model_hub._sha256(tmp_path / "head.pth")
    out = fetch_model("aesthetic", {**AESTHETIC, "sha256": digest}, tmp_path / "models" / "aesthetic")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", hub.SOURCE_FILE, "model.safetensors"]
    assert fake.calls[-1]["allow_patterns"] == [AESTHETIC["filename"]]
    emb = torch.nn.functional.normalize(torch.randn(4, 768), dim=-1)
    with torch.no_grad():
        assert torch.equal(load_aesthetic(out)(emb), model(emb))
    assert json.loads((out / hub.SOURCE_FILE).read_text())["source_sha256"] == digest
    assert _leftovers(out.parent) == ["aesthetic"]

    with pytest.raises(HubContentError, match="sha256"):
        fetch_model("aesthetic", {**AESTHETIC, "sha256": "0" * 64}, tmp_path / "models" / "bad")
    assert not (tmp_path / "models" / "bad").exists()


class _Payload:
    """Unpickling this would create a file: weights_only loading must refuse it unbuilt."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_object_in_pth_is_refused_by_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    state = AestheticMLP().state_dict()
    state["extra"] = _Payload(marker)
    torch.save(state, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights_only"):
        convert_aesthetic(tmp_path / "evil.pth", tmp_path / "aes")
    assert not marker.exists()
    assert not (tmp_path / "aes").exists()


def test_pth_with_non_tensor_values_or_other_shapes_is_refused(tmp_path):
    state = AestheticMLP().state_dict()
    torch.save({**state, "note": "hello"}, tmp_path / "note.pth")  # weights_only allows str, we do not
    with pytest.raises(ValueError, match="not tensors"):
        convert_aesthetic(tmp_path / "note.pth", tmp_path / "a")
    torch.save(torch.nn.Linear(768, 1).state_dict(), tmp_path / "linear.pth")
    with pytest.raises(ValueError, match="not a LAION aesthetic head"):
        convert_aesthetic(tmp_path / "linear.pth", tmp_path / "b")


def test_bare_sequential_state_dict_is_accepted(tmp_path):
    model = AestheticMLP(in_dim=32, hidden=(64, 32, 16, 8)).eval()
    torch.save(model.layers.state_dict(), tmp_path / "bare.pth")  # keys "0.weight", ...
    out = convert_aesthetic(tmp_path / "bare.pth", tmp_path / "aes")
    emb = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(load_aesthetic(out)(emb), model(emb))


def test_convert_aesthetic_cli(tmp_path):
    _laion_like_pth(tmp_path / "h.pth")
    assert model_hub._main(["convert-aesthetic", str(tmp_path / "h.pth"), str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]


def test_aesthetic_head_activation_is_applied_and_saved_by_name(tmp_path):
    """A head whose config.json names an activation keeps the LAION weight names, applies it after every
    hidden layer, and loads back to the same scores; an unknown name is refused naming the file."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    gelu = AestheticMLP(in_dim=16, hidden=(32, 16, 8, 4), activation="gelu").eval()
    linear = AestheticMLP(in_dim=16, hidden=(32, 16, 8, 4)).eval()
    linear.load_state_dict(gelu.state_dict())
    assert sorted(gelu.state_dict()) == sorted(AestheticMLP(in_dim=16, hidden=(32, 16, 8, 4)).state_dict())
    emb = torch.randn(5, 16)
    with torch.no_grad():
        x = emb
        for i in (0, 2, 4, 6):
            x = torch.nn.functional.gelu(gelu.layers[i](x))
        by_hand = gelu.layers[7](x).squeeze(-1)
        assert torch.allclose(gelu(emb), by_hand) and not torch.allclose(gelu(emb), linear(emb))
    out = tmp_path / "head"
    out.mkdir()
    save_file(gelu.state_dict(), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"in_dim": 16, "hidden": [32, 16, 8, 4], "activation": "gelu"}))
    with torch.no_grad():
        assert torch.equal(load_aesthetic(out)(emb), gelu(emb))
    (out / "config.json").write_text(json.dumps({"in_dim": 16, "hidden": [32, 16, 8, 4], "activation": "swish"}))
    with pytest.raises(ValueError, match=r"config\.json: aesthetic head activation 'swish'"):
        load_aesthetic(out)
