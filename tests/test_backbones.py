"""Backbones: DINOv2 equals a direct timm forward and the official forward at 224 px, loads
official-format and timm-format weights from a path or the local caches; `pixels` is local."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file
from timm.models.vision_transformer import checkpoint_filter_fn

from tats.pipeline.backbones import Preprocess, create_backbone, list_backbones

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
BLOCK_KEYS = (
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
    "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight",
    "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma",
)  # fmt: skip


def random_vit(timm_name: str, img_size: int, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A DINOv2-architecture timm ViT with random weights that all matter (layer scales and
    position embeddings are far from their near-zero inits)."""
    torch.manual_seed(seed)
    model = timm.create_model(
        timm_name, pretrained=False, img_size=img_size, num_classes=0, **kwargs
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(0.5, 1.0)
            elif name in ("pos_embed", "cls_token", "reg_token"):
                param.normal_(0.0, 1.0)
            elif name.startswith("norm") or ".norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def official_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The timm model's weights under the official DINOv2 key names and layout."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dim = state["cls_token"].shape[-1]
    if "reg_token" in state:  # official: cls has a position, registers follow cls
        cls_pos = torch.randn(1, 1, dim)
        state["register_tokens"] = state.pop("reg_token")
        state["cls_token"] = state["cls_token"] - cls_pos
        state["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
    state["mask_token"] = torch.zeros(1, dim)
    return state


def official_keys(depth: int, registers: bool) -> set[str]:
    keys = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight"}
    keys |= {"patch_embed.proj.bias", "norm.weight", "norm.bias"}
    keys |= {"register_tokens"} if registers else set()
    return keys | {f"blocks.{i}.{part}" for i in range(depth) for part in BLOCK_KEYS}


def original_preprocess(frames: np.ndarray) -> torch.Tensor:
    """The original TATs transform: /255, torchvision Resize((224, 224)), CLIP Normalize."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    x = TF.resize(x, [224, 224], antialias=True)
    return TF.normalize(x, CLIP_MEAN, CLIP_STD)


def official_forward(model: torch.nn.Module, state: dict, images: torch.Tensor) -> torch.Tensor:
    """Patch tokens of the official DINOv2 forward (hub settings) at the images' size, run with
    the blocks and norm of `model`, which holds the same weights."""
    registers = "register_tokens" in state
    x = F.conv2d(
        images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=14
    )
    grid, dim = x.shape[-1], x.shape[1]
    x = torch.cat([state["cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1)
    side = math.isqrt(state["pos_embed"].shape[1] - 1)
    patch_pos = state["pos_embed"][:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if registers:  # dinov2_*_reg: interpolate_antialias=True, interpolate_offset=0.0
        patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", antialias=True)
    else:  # dinov2_*: interpolate_antialias=False, interpolate_offset=0.1
        scale = (grid + 0.1) / side
        patch_pos = F.interpolate(patch_pos, scale_factor=(scale, scale), mode="bicubic")
    pos = torch.cat([state["pos_embed"][:, :1], patch_pos.flatten(2).transpose(1, 2)], dim=1)
    x = x + pos
    if registers:
        reg = state["register_tokens"].expand(len(x), -1, -1)
        x = torch.cat([x[:, :1], reg, x[:, 1:]], dim=1)
    for block in model.blocks:
        x = block(x)
    x = model.norm(x)
    return x[:, 1 + (4 if registers else 0) :].reshape(len(x), grid, grid, dim)


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    """One clip of two 90 x 130 frames (not square: exercises the squash resize)."""
    return np.random.default_rng(1).integers(0, 256, (1, 2, 90, 130, 3), dtype=np.uint8)


def test_registry_names():
    names = list_backbones()
    for size in "sbl":
        assert f"dinov2_vit{size}14" in names and f"dinov2_vit{size}14_reg" in names
    assert "pixels" in names
    with pytest.raises(ValueError, match="unknown backbone 'dinov3'.*dinov2_vitb14"):
        create_backbone("dinov3")


def test_dinov2_equals_direct_timm_forward(tmp_path, frames):
    model = random_vit("vit_small_patch14_dinov2", 224, depth=2)
    path = tmp_path / "vits14_depth2.safetensors"
    save_file(model.state_dict(), str(path))

    backbone = create_backbone("dinov2_vits14", weights=path, depth=2, precision="fp32")
    features = backbone(frames)

    with torch.no_grad():
        reference = model.forward_features(original_preprocess(frames[0]))[:, 1:]
    assert features.shape == (1, 2, 16, 16, 384) and features.dtype == torch.float32
    assert (backbone.grid, backbone.dim, backbone.patch_size) == ((16, 16), 384, 14)
    torch.testing.assert_close(features[0], reference.reshape(2, 16, 16, 384), rtol=1e-3, atol=1e-3)
    # the same frames as a tensor, and frame order is kept
    torch.testing.assert_close(backbone(torch.from_numpy(frames))[0], features[0])
    reversed_frames = frames[:, ::-1]  # negative strides
    reversed_frames.flags.writeable = False
    torch.testing.assert_close(backbone(reversed_frames)[0, 0], features[0, 1])


@pytest.mark.parametrize(
    "name,timm_name",
    [("dinov2_vits14", "vit_small_patch14_dinov2"),
     ("dinov2_vits14_reg", "vit_small_patch14_reg4_dinov2")],
)  # fmt: skip
def test_official_state_dict_loads_and_matches_official_forward(tmp_path, frames, name, timm_name):
    model = random_vit(timm_name, 518)  # the official 37 x 37 position embedding
    state = official_state_dict(model)
    registers = name.endswith("_reg")
    assert set(state) == official_keys(12, registers)
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    path = tmp_path / f"{name}_pretrain.pth"
    torch.save(state, path)

    backbone = create_backbone(name, weights=path, precision="fp32")
    features = backbone(frames)

    with torch.no_grad():
        reference = official_forward(model, state, original_preprocess(frames[0]))
    torch.testing.assert_close(features[0], reference, rtol=1e-3, atol=1e-3)
    assert backbone.identity == {
        "name": name,
        "weights_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "preprocess": {"size": 224, "mean": CLIP_MEAN, "std": CLIP_STD},
        "precision": "fp32",  # as asked (auto: bf16 where the device has bf16 units)
    }
    if not registers:
        # timm's default resampling (antialiased, no offset) gives other features: the
        # official resampling above is what makes them equal
        timm_model = timm.create_model(timm_name, img_size=224, num_classes=0).eval()
        timm_model.load_state_dict(checkpoint_filter_fn(dict(state), timm_model))
        with torch.no_grad():
            timm_default = timm_model.forward_features(original_preprocess(frames[0]))[:, 1:]
        assert (timm_default.reshape_as(reference) - reference).abs().max() > 0.05


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point the torch hub and Hugging Face caches at empty folders; returns both."""
    torch_home, hf_cache = tmp_path / "torch", tmp_path / "hf"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf_cache))
    return torch_home, hf_cache


def test_weights_from_torch_hub_cache(empty_caches):
    torch_home, _ = empty_caches
    path = torch_home / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    path.parent.mkdir(parents=True)
    torch.save(official_state_dict(random_vit("vit_small_patch14_dinov2", 518)), path)
    backbone = create_backbone("dinov2_vits14")
    assert backbone.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_weights_from_hugging_face_cache(empty_caches, frames):
    _, hf_cache = empty_caches
    repo = hf_cache / "models--timm--vit_small_patch14_reg4_dinov2.lvd142m"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    path = repo / "snapshots" / "0123abcd" / "model.safetensors"
    path.parent.mkdir(parents=True)
    model = random_vit("vit_small_patch14_reg4_dinov2", 518)  # timm layout, 37 x 37 positions
    save_file(model.state_dict(), str(path))

    backbone = create_backbone("dinov2_vits14_reg", precision="fp32")
    assert backbone.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    # timm's own resampling of a register model is the official one: compare with it
    dynamic = random_vit("vit_small_patch14_reg4_dinov2", 518, dynamic_img_size=True)
    with torch.no_grad():
        reference = dynamic.forward_features(original_preprocess(frames[0]))[:, 5:]
    reference = reference.reshape(2, 16, 16, 384)
    torch.testing.assert_close(backbone(frames)[0], reference, rtol=1e-3, atol=1e-3)


def test_missing_weights_say_where_to_look(empty_caches):
    torch_home, _ = empty_caches
    with pytest.raises(FileNotFoundError) as error:
        create_backbone("dinov2_vitb14_reg")
    message = str(error.value)
    assert "--backbone-weights" in message
    url = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth"
    assert url in message
    assert "timm/vit_base_patch14_reg4_dinov2.lvd142m" in message
    assert str(torch_home / "hub" / "checkpoints" / "dinov2_vitb14_reg4_pretrain.pth") in message


def test_bad_weight_files_name_the_file_and_the_problem(tmp_path):
    """Each file that is not weights gets one line naming it and what it is instead."""
    folder = tmp_path / "weights"
    folder.mkdir()
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    text = tmp_path / "notes.pth"
    text.write_text("these are my notes\nnot weights\n")
    noise = tmp_path / "noise.pth"
    noise.write_bytes(bytes([0x5F, 0x82, 0xC2, 0xD9]) + np.random.default_rng(0).bytes(996))
    arrays = tmp_path / "arrays.pth"  # numpy arrays: pickled objects, refused weights-only
    torch.save({"pos_embed": np.zeros((1, 5, 8), np.float32)}, arrays)
    truncated = tmp_path / "truncated.pth"
    torch.save(random_vit("vit_small_patch14_dinov2", 112, depth=1).state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    cases = {
        folder: f"{folder}: is a folder, not a weights file",
        empty: f"{empty}: empty file (0 bytes), not a weights file",
        text: f"{text}: not a weights file: it holds text ('these are my notes not weights'), "
        "neither a PyTorch file (torch.save) nor safetensors",
        noise: f"{noise}: not a weights file: it starts with the bytes 5f 82 c2 d9",
        arrays: f"{arrays}: torch.load(weights_only=True) refuses it: Unsupported global: "
        "GLOBAL numpy",
        truncated: f"{truncated}: damaged PyTorch file (",
    }
    for path, start in cases.items():
        with pytest.raises(ValueError) as error:
            create_backbone("dinov2_vits14", weights=path)
        message = str(error.value)
        assert message.startswith(start), message
        assert "\n" not in message and len(message) < 400, message
    # The refusal's useful part comes first, and how to make a file that loads.
    with pytest.raises(ValueError, match=r"model.state_dict\(\)"):
        create_backbone("dinov2_vits14", weights=arrays)

    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="other.pth: no 'pos_embed'"):
        create_backbone("dinov2_vits14", weights=other)

    small = tmp_path / "small.pth"
    torch.save(random_vit("vit_small_patch14_dinov2", 224, depth=2).state_dict(), small)
    with pytest.raises(ValueError) as error:
        create_backbone("dinov2_vitb14", weights=small, depth=2)
    assert str(error.value) == (
        f"{small}: weights do not fit backbone 'dinov2_vitb14' (width 768, 2 blocks, no "
        "registers): they look like dinov2_vits14 (ViT-S/14, no registers, 2 blocks, timm format)"
    )
    with pytest.raises(FileNotFoundError, match="absent.pth: weights file not found"):
        create_backbone("dinov2_vits14", weights=tmp_path / "absent.pth")


@pytest.mark.parametrize("layout", ["official", "timm"])
def test_register_weights_given_to_a_plain_backbone_say_what_they_are(tmp_path, layout):
    """dinov2_vits14_reg4_pretrain.pth (or timm's reg4 weights) for dinov2_vits14, and the
    other way round: refused in one line naming the model the file looks like."""
    reg = random_vit("vit_small_patch14_reg4_dinov2", 518, depth=2)
    plain = random_vit("vit_small_patch14_dinov2", 518, depth=2)
    pick = official_state_dict if layout == "official" else (lambda m: m.state_dict())
    reg_file = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    plain_file = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(pick(reg), reg_file)
    torch.save(pick(plain), plain_file)
    with pytest.raises(ValueError) as error:
        create_backbone("dinov2_vits14", weights=reg_file, depth=2)
    assert str(error.value) == (
        f"{reg_file}: weights do not fit backbone 'dinov2_vits14' (width 384, 2 blocks, no "
        f"registers): they look like dinov2_vits14_reg (ViT-S/14, 4 registers, 2 blocks, "
        f"{layout} format)"
    )
    with pytest.raises(ValueError) as error:
        create_backbone("dinov2_vits14_reg", weights=plain_file, depth=2)
    assert str(error.value) == (
        f"{plain_file}: weights do not fit backbone 'dinov2_vits14_reg' (width 384, 2 blocks, 4 "
        f"registers): they look like dinov2_vits14 (ViT-S/14, no registers, 2 blocks, "
        f"{layout} format)"
    )
    # Each file fits its own backbone.
    assert create_backbone("dinov2_vits14_reg", weights=reg_file, depth=2).dim == 384
    assert create_backbone("dinov2_vits14", weights=plain_file, depth=2).dim == 384


def test_register_weights_on_the_command_line_exit_2_with_one_line(tmp_path, synth_small):
    """`tats-extract features --backbone dinov2_vits14 --backbone-weights <reg4 file>`: exit 2,
    one line, before any video is read (timm's conversion crashed here: exit 4)."""
    from typer.testing import CliRunner

    from tats.cli.extract import app

    reg_file = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(official_state_dict(random_vit("vit_small_patch14_reg4_dinov2", 518)), reg_file)
    out = tmp_path / "features.zarr"
    result = CliRunner().invoke(app, [
        "features", "--manifest", str(synth_small), "--out", str(out), "--backbone",
        "dinov2_vits14", "--backbone-weights", str(reg_file), "--workers", "0", "--no-progress",
    ])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        f"error: {reg_file}: weights do not fit backbone 'dinov2_vits14' (width 384, 12 blocks, "
        f"no registers): they look like dinov2_vits14_reg (ViT-S/14, 4 registers, 12 blocks, "
        f"official format)"
    )
    assert not out.exists()


def test_frames_must_be_uint8_clips():
    backbone = create_backbone("pixels")
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\], got torch.float32"):
        backbone(np.zeros((1, 2, 28, 28, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[B, S, H, W, 3\], got \(2, 28, 28, 3\)"):
        backbone(np.zeros((2, 28, 28, 3), dtype=np.uint8))


def test_pixels_backbone_is_local_and_deterministic():
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (2, 3, 224, 224, 3), dtype=np.uint8)
    backbone = create_backbone("pixels")
    features = backbone(clip)
    assert features.shape == (2, 3, 16, 16, 64) and features.dtype == torch.float32
    assert backbone.identity["weights_sha256"] is None and backbone.dim == 64
    torch.testing.assert_close(create_backbone("pixels")(clip), features, rtol=0, atol=0)

    # changing pixels inside patch (row 3, column 5) changes that patch's features only
    changed = clip.copy()
    changed[1, 2, 3 * 14 + 2 : 3 * 14 + 12, 5 * 14 + 2 : 5 * 14 + 12] = 255
    moved = (backbone(changed) - features).abs().amax(dim=-1)
    assert moved[1, 2, 3, 5] > 0.1
    moved[1, 2, 3, 5] = 0
    assert moved.max() == 0

    # a flat colour gives the same features everywhere, and different colours differ
    flat = np.zeros((1, 2, 224, 224, 3), dtype=np.uint8)
    flat[0, 1] = (200, 30, 30)
    flat_features = backbone(flat)
    assert torch.allclose(flat_features[0, 0], flat_features[0, 0, :1, :1].expand(16, 16, 64))
    assert (flat_features[0, 0] - flat_features[0, 1]).abs().max() > 0.1
    with pytest.raises(ValueError, match="'pixels' has no weights"):
        create_backbone("pixels", weights="x.pth")


def test_preprocess_size_sets_the_grid():
    backbone = create_backbone("pixels", preprocess=Preprocess(size=112, mean=(0.5,) * 3))
    assert backbone(np.zeros((1, 1, 50, 60, 3), dtype=np.uint8)).shape == (1, 1, 8, 8, 64)
    assert backbone.identity["preprocess"] == {"size": 112, "mean": [0.5] * 3, "std": CLIP_STD}
    with pytest.raises(ValueError, match="input size 100 is not a multiple of its patch size 14"):
        create_backbone("pixels", preprocess=Preprocess(size=100))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_path_matches_cpu(tmp_path, frames):
    path = tmp_path / "vits14.pth"
    torch.save(official_state_dict(random_vit("vit_small_patch14_dinov2", 518)), path)
    on_cpu = create_backbone("dinov2_vits14", weights=path, precision="fp32")(frames)
    on_gpu = create_backbone("dinov2_vits14", weights=path, device="cuda")(frames)
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
    scale = on_cpu.abs().mean()
    assert (on_gpu.cpu() - on_cpu).abs().mean() < 0.05 * scale


def test_bf16_features_stay_close_to_fp32_and_auto_follows_the_cpu(tmp_path, frames, monkeypatch):
    """bf16 (what `auto` picks on CPUs with AMX or AVX512-BF16 units, and on CUDA) against
    fp32, on a random ViT-S/14 of the official layout; the precision is recorded."""
    from tats import runtime

    path = tmp_path / "vits14.pth"
    torch.save(official_state_dict(random_vit("vit_small_patch14_dinov2", 518)), path)
    fp32 = create_backbone("dinov2_vits14", weights=path, precision="fp32")
    bf16 = create_backbone("dinov2_vits14", weights=path, precision="bf16")
    assert bf16.identity["precision"] == "bf16" and fp32.identity["precision"] == "fp32"
    a, b = fp32(frames).flatten(0, -2), bf16(frames).flatten(0, -2)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cosine.mean() > 0.999 and cosine.min() > 0.99, (cosine.mean(), cosine.min())
    for units, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(runtime, "bf16_units", lambda device, units=units: units)
        assert create_backbone("dinov2_vits14", weights=path).precision == expected
    assert create_backbone("pixels").precision == "fp32"  # whatever the device
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        create_backbone("dinov2_vits14", weights=path, precision="half")
