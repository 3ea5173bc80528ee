import math

import pytest
import torch

from tats.model import ModelConfig, TATsModel, orientation_histograms, relative_offsets

SMALL = ModelConfig(feature_dim=16, num_heads=2, num_frames=4, grid_size=4, num_classes=5)


def small_model(scrambled: bool = False, **overrides) -> TATsModel:
    """A small model; scrambled: weights of a trained-like scale, so that effects are large."""
    torch.manual_seed(0)
    model = TATsModel(ModelConfig(**{**SMALL.__dict__, **overrides})).eval()
    if scrambled:
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.3)
    return model


def random_inputs(cfg: ModelConfig, b: int = 2, p: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(
        b, cfg.num_frames, cfg.grid_size, cfg.grid_size, cfg.feature_dim, generator=g
    )
    positions = torch.rand(b, cfg.num_frames, p, 2, generator=g) * 2 - 1
    mask = torch.ones(b, cfg.num_frames, p, dtype=torch.bool)
    return features, positions, mask


def patch_centre(index: int, size: int, align_corners: bool) -> float:
    """Normalised coordinate of the centre of patch `index` under grid_sample's convention."""
    if align_corners:
        return -1 + 2 * index / (size - 1)
    return -1 + (2 * index + 1) / size


def zero_embeddings(model: TATsModel) -> None:
    with torch.no_grad():
        model.space_pos_embed.zero_()
        model.time_pos_embed.zero_()


def test_forward_shapes_and_dtypes():
    model = small_model()
    features, positions, mask = random_inputs(model.cfg, b=3, p=7)
    tokens, logits = model(features.half(), positions, mask)  # float16 as the store holds them
    assert tokens.shape == (3, 4, 7, 16) and tokens.dtype == torch.float32
    assert logits.shape == (3, 5)
    assert torch.isfinite(tokens).all() and torch.isfinite(logits).all()


def test_width_other_than_feature_dim_projects():
    model = small_model(width=8, sampling="bilinear")
    features, positions, mask = random_inputs(model.cfg)
    tokens, logits = model(features, positions, mask)
    assert isinstance(model.proj, torch.nn.Linear) and model.proj.in_features == 16
    assert tokens.shape == (2, 4, 6, 8) and logits.shape == (2, 5)


def test_defaults_are_the_original_architecture():
    cfg = ModelConfig()
    assert (cfg.dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio) == (768, 1, 8, 4.0)
    assert cfg.qkv_bias and cfg.drop_path_rate == 0.2
    assert (cfg.num_frames, cfg.grid_size, cfg.num_classes, cfg.sampling) == (8, 16, 64, "nearest")
    model = TATsModel(cfg)
    assert isinstance(model.proj, torch.nn.Identity)  # D = C: no projection, as the original
    d = 768

    def linear(i: int, o: int) -> int:
        return i * o + o

    attention = linear(d, 3 * d) + linear(d, d)
    mlp = linear(d, 4 * d) + linear(4 * d, d)
    block = 3 * 2 * d + 2 * attention + linear(d, d) + mlp  # 3 norms, temporal_fc
    embeddings = 256 * d + 8 * d + d  # space, time, CLS
    head = 2 * d + linear(d, d) + linear(d, 64)  # final norm, pre-logits, classifier
    expected = embeddings + block + head
    assert sum(p.numel() for p in model.parameters()) == expected


def test_effective_init_matches_original():
    model = TATsModel(ModelConfig())
    # Xavier-uniform bounds sqrt(6 / (fan_in + fan_out)) of the [1, N, D] embeddings.
    for param, n in ((model.space_pos_embed, 256), (model.time_pos_embed, 8), (model.cls_token, 1)):
        bound = math.sqrt(6 / ((n + 1) * 768))
        assert param.abs().max() <= bound and param.abs().max() > 0.9 * bound
    qkv = model.blocks[0].temporal_attn.qkv
    assert abs(qkv.weight.std().item() - 0.02) < 0.002 and qkv.bias.abs().max() == 0


def test_single_block_has_no_drop_path_so_train_equals_eval():
    # The original spreads drop path as linspace(0, 0.2, depth): one block gets rate 0.
    model = small_model()
    features, positions, mask = random_inputs(model.cfg)
    eval_out = model(features, positions, mask)
    model.train()
    train_out = model(features, positions, mask)
    for a, b in zip(eval_out, train_out, strict=True):
        torch.testing.assert_close(a, b)
    deeper = small_model(depth=3)
    assert [blk.drop_path_rate for blk in deeper.blocks] == pytest.approx([0.0, 0.1, 0.2])


@pytest.mark.parametrize("align_corners", [True, False])
def test_nearest_sampling_takes_the_patch_under_the_point(align_corners):
    model = small_model(align_corners=align_corners)
    zero_embeddings(model)
    cfg = model.cfg
    features = torch.randn(1, 4, 4, 4, 16)
    cells = [(0, 0), (1, 2), (3, 1), (3, 3)]  # (row, col)
    # Exactly at the centre, and a third of a patch spacing off it: both are the same patch.
    spacing = patch_centre(1, 4, align_corners) - patch_centre(0, 4, align_corners)
    xy = []
    for r, c in cells:
        x, y = patch_centre(c, 4, align_corners), patch_centre(r, 4, align_corners)
        xy += [(x, y), (x - spacing / 3, y + spacing / 3)]
    positions = torch.tensor(xy).expand(1, cfg.num_frames, -1, -1)
    tokens = model.sample_tokens(features, positions)
    for i, (r, c) in enumerate(cells):
        for k in (2 * i, 2 * i + 1):
            torch.testing.assert_close(tokens[0, :, k], features[0, :, r, c])


def test_bilinear_sampling_interpolates_between_patch_centres():
    model = small_model(sampling="bilinear")
    zero_embeddings(model)
    features = torch.randn(1, 4, 4, 4, 16)
    c1, c2 = patch_centre(1, 4, True), patch_centre(2, 4, True)
    y = patch_centre(3, 4, True)
    quarter = c1 + (c2 - c1) / 4  # a quarter of the way from column 1 to column 2, on row 3
    positions = torch.tensor([(c1, y), (quarter, y)]).expand(1, 4, -1, -1)
    tokens = model.sample_tokens(features, positions)
    torch.testing.assert_close(tokens[0, :, 0], features[0, :, 3, 1])
    expected = 0.75 * features[0, :, 3, 1] + 0.25 * features[0, :, 3, 2]
    torch.testing.assert_close(tokens[0, :, 1], expected)


@pytest.mark.parametrize("sampling", ["nearest", "bilinear"])
def test_points_outside_the_frame_get_zero_features(sampling):
    model = small_model(sampling=sampling)  # embeddings left random: they are zeroed too
    features = torch.randn(1, 4, 4, 4, 16)
    positions = torch.tensor([(1.8, 0.0), (0.0, -2.0), (0.0, 0.0)]).expand(1, 4, -1, -1)
    tokens = model.sample_tokens(features, positions)
    assert tokens[0, :, :2].abs().max() == 0
    assert tokens[0, :, 2].abs().min() > 0


def test_space_and_time_embeddings_are_added_row_major():
    model = small_model()
    features = torch.zeros(1, 4, 4, 4, 16)
    r, c = 2, 3
    positions = torch.tensor([(patch_centre(c, 4, True), patch_centre(r, 4, True))]).expand(
        1, 4, 1, 2
    )
    tokens = model.sample_tokens(features, positions)
    for s in range(4):
        expected = model.space_pos_embed[0, r * 4 + c] + model.time_pos_embed[0, s]
        torch.testing.assert_close(tokens[0, s, 0], expected.detach())


def masked_case():
    """Tokens and a query mask with late-starting points and one padding point."""
    model = small_model(scrambled=True, depth=2)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 4, 6, 16, generator=g)
    mask = torch.ones(2, 4, 6, dtype=torch.bool)
    mask[0, :2, 1] = False  # point 1 starts at frame 2
    mask[1, :3, 4] = False  # point 4 starts at frame 3
    mask[1, :, 5] = False  # point 5 is padding
    return model, tokens, mask


def test_query_mask_hides_masked_tokens_from_cls_and_other_tokens():
    model, tokens, mask = masked_case()
    out_tokens, cls = model.encode(tokens, mask)
    perturbed = torch.where(mask[..., None], tokens, 100 * torch.randn_like(tokens))
    out_tokens2, cls2 = model.encode(perturbed, mask)
    torch.testing.assert_close(cls2, cls)
    torch.testing.assert_close(out_tokens2[mask], out_tokens[mask])
    # The masked pairs' own tokens do see their input (the original keeps them) ...
    late = ~mask & mask.any(dim=1, keepdim=True)
    assert (out_tokens2[late] - out_tokens[late]).abs().amax(-1).min() > 1e-3
    # ... and an unmasked change does reach CLS and the other tokens: the test can fail.
    changed = tokens.clone()
    changed[0, 3, 1] = 5 * torch.randn(16)  # not a constant shift, which LayerNorm removes
    out_tokens3, cls3 = model.encode(changed, mask)
    assert (cls3[0] - cls[0]).abs().max() > 1e-3
    assert (out_tokens3[0, 3, 0] - out_tokens[0, 3, 0]).abs().max() > 1e-3


def test_padding_points_are_zero_and_never_nan():
    model, tokens, mask = masked_case()
    model.train()
    tokens.requires_grad_(True)
    out_tokens, cls = model.encode(tokens, mask)
    assert out_tokens[1, :, 5].abs().max() == 0
    assert torch.isfinite(out_tokens).all() and torch.isfinite(cls).all()
    (out_tokens.sum() + cls.sum()).backward()
    assert torch.isfinite(tokens.grad).all()
    assert tokens.grad[1, :, 5].abs().max() == 0


def test_query_mask_end_to_end_through_the_grid():
    # Point 0 at frame 0 is masked and is the only point reading cell (0, 0) there.
    model = small_model(scrambled=True)
    features, _, _ = random_inputs(model.cfg, b=1)
    centre = [patch_centre(i, 4, True) for i in range(4)]
    xy = [(centre[0], centre[0]), (centre[2], centre[1]), (centre[3], centre[3])]
    positions = torch.tensor(xy).expand(1, 4, -1, -1)
    mask = torch.ones(1, 4, 3, dtype=torch.bool)
    mask[0, 0, 0] = False
    tokens, logits = model(features, positions, mask)
    changed = features.clone()
    changed[0, 0, 0, 0] = 50 * torch.randn(16)
    tokens2, logits2 = model(changed, positions, mask)
    torch.testing.assert_close(logits2, logits)
    torch.testing.assert_close(tokens2[mask], tokens[mask])
    changed[0, 1, 0, 0] = 50 * torch.randn(16)  # frame 1 of point 0 is not masked
    _, logits3 = model(changed, positions, mask)
    assert (logits3 - logits).abs().max() > 1e-3


def test_bad_inputs_are_clear_errors():
    model = small_model()
    features, positions, mask = random_inputs(model.cfg)
    with pytest.raises(ValueError, match="features: expected"):
        model(features[:, :3], positions[:, :3], mask[:, :3])
    with pytest.raises(ValueError, match="feature_dim"):
        model(features[..., :8], positions, mask)
    with pytest.raises(ValueError, match="positions: expected"):
        model(features, positions[..., :1], mask)
    with pytest.raises(ValueError, match="mask: expected bool"):
        model(features, positions, mask.float())
    with pytest.raises(ValueError, match="sampling"):
        ModelConfig(sampling="bicubic")
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(feature_dim=10, num_heads=4)


# ---------------------------------------------------------------------------------------------
# Trokens' motion tokens


def test_rightward_motion_lands_in_the_bin_of_angle_zero():
    positions = torch.zeros(3, 2, 2)  # [S, P, 2]
    positions[:, 0, 0] = torch.tensor([-0.5, -0.3, 0.2])  # point 0 moves right by 0.2, 0.5
    hist = orientation_histograms(positions, 32)
    assert hist.shape == (3, 2, 32)
    assert hist[0].abs().max() == 0  # frame 0 has no displacement
    expected = torch.zeros(2, 32)
    expected[0, 0], expected[1, 0] = 0.2, 0.5  # weighted by the length, not normalised
    torch.testing.assert_close(hist[1:, 0], expected)
    assert hist[:, 1].abs().max() == 0  # point 1 stands still


@pytest.mark.parametrize(
    "degrees, lower, upper, lower_share",
    [
        (56.25, 1, 2, 0.75),  # 45 * 1.25: a quarter of the way from bin 1 (45) to bin 2 (90)
        (80.0, 1, 2, 2 / 9),  # nearer bin 2
        (90.0, 2, 3, 1.0),  # +y, down in the image: exactly bin 2
        (-10.0, 7, 0, 2 / 9),  # 350 degrees: between bin 7 (315) and bin 0, nearer bin 0
        (180.0, 4, 5, 1.0),  # leftward
    ],
)
def test_an_angle_between_two_bins_is_split_nearer_bin_first(degrees, lower, upper, lower_share):
    angle = math.radians(degrees)
    positions = torch.zeros(2, 1, 2)
    positions[1, 0] = 0.3 * torch.tensor([math.cos(angle), math.sin(angle)])
    hist = orientation_histograms(positions, 8)[1, 0]
    expected = torch.zeros(8)
    expected[lower] += 0.3 * lower_share
    expected[upper] += 0.3 * (1 - lower_share)
    torch.testing.assert_close(hist, expected)


def test_relative_offsets_are_pairwise_and_zero_for_invisible_pairs():
    g = torch.Generator().manual_seed(0)
    positions = torch.rand(2, 3, 4, 2, generator=g) * 2 - 1  # [B, S, P, 2]
    visible = torch.ones(2, 3, 4, dtype=torch.bool)
    visible[0, 1, 2] = False  # point 2 hidden at frame 1 of clip 0
    offsets = relative_offsets(positions, visible)
    assert offsets.shape == (2, 3, 4, 8)
    pairs = offsets.view(2, 3, 4, 4, 2)  # [..., m, n, (x, y)]
    for b, s, m, n in [(1, 0, 0, 3), (0, 2, 3, 1), (0, 1, 0, 3), (1, 2, 2, 2)]:
        torch.testing.assert_close(pairs[b, s, m, n], positions[b, s, m] - positions[b, s, n])
    assert pairs[0, 1, 2].abs().max() == 0  # the hidden point sees nothing
    assert pairs[0, 1, :, 2].abs().max() == 0  # and nobody sees it
    assert pairs[0, 1, 0, 1].abs().min() > 0 and pairs[0, 0, 2, 0].abs().min() > 0
    shifted = relative_offsets(positions + torch.tensor([0.37, -0.21]), visible)
    torch.testing.assert_close(shifted, offsets)


def motion_inputs(p: int = 6, seed: int = 2):
    cfg = SMALL
    features, positions, mask = random_inputs(cfg, b=2, p=p, seed=seed)
    visible = mask.clone()
    visible[0, 1:3, 1] = False
    return features, positions, mask, visible


@pytest.mark.parametrize("motion", ["hod", "offsets", "both"])
def test_motion_tokens_make_the_model_see_trajectories_on_constant_features(motion):
    # Constant features and no position embeddings: the appearance tokens are the same for
    # every point and frame, so only the motion tokens can tell two trajectories apart.
    model = small_model(scrambled=True, motion=motion, num_points=6)
    zero_embeddings(model)
    features, positions, mask, visible = motion_inputs()
    features = torch.ones_like(features)
    tokens, logits = model(features, positions, mask, visible)
    assert torch.isfinite(tokens).all() and torch.isfinite(logits).all()
    moved = positions.clone()
    moved[0, 2:, 3] += 0.05  # point 3 of clip 0 moves differently from frame 2 on
    tokens2, logits2 = model(features, moved, mask, visible)
    assert (logits2[0] - logits[0]).abs().max() > 1e-4
    torch.testing.assert_close(logits2[1], logits[1])  # clips are embedded independently
    plain = small_model(scrambled=True, num_points=6)
    zero_embeddings(plain)
    _, a = plain(features, positions, mask, visible)
    _, b = plain(features, moved, mask, visible)
    torch.testing.assert_close(a, b)  # without motion tokens the model cannot see it


def test_motion_layers_use_quick_gelu():
    # Trokens' motion layers (`trokens/models/branches/motion_blocks.py`): QuickGELU,
    # x * sigmoid(1.702 x), between their two Linear layers, not the exact GELU.
    model = small_model(motion="both", num_points=6)
    x = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(0)) * 3
    for embed in (model.hod_embed, model.offsets_embed):
        x_in = x.repeat(1, 1, embed.fc1.in_features // 12 + 1)[..., : embed.fc1.in_features]
        hidden = embed.fc1(x_in)
        quick = embed.norm(embed.fc2(hidden * torch.sigmoid(1.702 * hidden)))
        exact = embed.norm(embed.fc2(torch.nn.functional.gelu(hidden)))
        torch.testing.assert_close(embed(x_in), quick)
        assert (embed(x_in) - exact).abs().max() > 1e-3  # the two activations differ here


def test_motion_layers_are_initialised_like_the_others_and_their_norms_do_not_decay():
    model = TATsModel(ModelConfig(motion="both"))
    for embed, in_dim in ((model.hod_embed, 32), (model.offsets_embed, 512)):
        assert (embed.fc1.in_features, embed.fc1.out_features) == (in_dim, 4 * 768)
        assert (embed.fc2.in_features, embed.fc2.out_features) == (4 * 768, 768)
        for linear in (embed.fc1, embed.fc2):
            # PyTorch's default (what Trokens' layers kept) has std 1 / sqrt(3 * in_features):
            # 0.10 and 0.010 here, and non-zero biases.
            assert abs(linear.weight.std().item() - 0.02) < 0.002
            assert linear.bias.abs().max() == 0
        assert (embed.norm.weight == 1).all() and (embed.norm.bias == 0).all()
    spared = model.no_weight_decay()
    motion = {n for n, _ in model.named_parameters() if n.startswith(("hod_", "offsets_"))}
    assert {n for n in motion if n.endswith("weight") and ".fc" in n}.isdisjoint(spared)
    assert motion - spared == {f"{e}.fc{i}.weight" for e in ("hod_embed", "offsets_embed")
                               for i in (1, 2)}  # fmt: skip
    assert TATsModel(ModelConfig()).no_weight_decay() == {
        "space_pos_embed", "time_pos_embed", "cls_token"
    }  # fmt: skip


def test_motion_inputs_are_checked():
    model = small_model(motion="both", num_points=6)
    features, positions, mask, visible = motion_inputs()
    with pytest.raises(ValueError, match="visible: expected bool"):
        model(features, positions, mask)
    with pytest.raises(ValueError, match="takes 6 points per clip"):
        model(features, positions[:, :, :5], mask[..., :5], visible[..., :5])
    with pytest.raises(ValueError, match="motion"):
        ModelConfig(motion="flow")
    hod_only = small_model(motion="hod", num_points=6)
    hod_only(features, positions, mask)  # the histograms need no visibility
    assert model.hod_embed is not None and hod_only.offsets_embed is None
