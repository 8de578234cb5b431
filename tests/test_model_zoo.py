"""lab.model_zoo: every conditioning style on the tiny UNet at 32x32, CFG algebra, the registries' errors, and the
reference architecture's exact config (built, never run: it is 114M parameters)."""

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from lab.errors import UserError
from lab.conditioning import ConditionalUNet, guided_prediction
from lab.model_zoo import CONDITIONING, UNETS, build_model, conditioning_problem

STYLES = list(CONDITIONING)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {style: build_model("tiny", style, image_size=32) for style in STYLES}


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 32, 32, generator=g)
    t = torch.tensor([5, 400, 999])
    labels = torch.zeros(3, 24)
    labels[0, [0, 7]] = 1
    labels[1, 23] = 1  # row 2 stays empty
    return x, t, labels


@pytest.mark.parametrize("style", STYLES)
def test_forward_shape_and_backward(models, batch, style):
    model = models[style]
    model.zero_grad()
    x, t, labels = batch
    out = model(x, t, labels, drop=torch.tensor([False, True, False]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in (p.grad for p in model.cond.parameters()))


@pytest.mark.parametrize("style", STYLES)
def test_scalar_timestep_is_broadcast(models, batch, style):
    x, _, labels = batch
    with torch.no_grad():
        a = models[style](x, 250, labels)
        b = models[style](x, torch.full((3,), 250), labels)
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("style", STYLES)
def test_null_condition_differs_from_empty_labels(models, batch, style):
    x, t, _ = batch
    empty = torch.zeros(3, 24)
    with torch.no_grad():
        out_empty = models[style](x, t, empty)
        out_null = models[style](x, t, empty, drop=torch.ones(3, dtype=torch.bool))
    assert (out_empty - out_null).abs().max() > 1e-4


@pytest.mark.parametrize("style", STYLES)
def test_drop_mask_rows_equal_null_output(models, batch, style):
    x, t, labels = batch
    model = models[style]
    with torch.no_grad():
        mixed = model(x, t, labels, drop=torch.tensor([True, False, True]))
        null = model(x, t, labels, drop=torch.ones(3, dtype=torch.bool))
        cond = model(x, t, labels)
    assert torch.allclose(mixed[[0, 2]], null[[0, 2]], atol=1e-5)
    assert torch.allclose(mixed[1], cond[1], atol=1e-5)
    # the null ignores the labels entirely
    with torch.no_grad():
        null_other = model(x, t, torch.ones(3, 24), drop=torch.ones(3, dtype=torch.bool))
    assert torch.allclose(null, null_other, atol=1e-5)


@pytest.mark.parametrize("style", STYLES)
def test_a_counted_null_knows_how_many_labels_but_not_which(style):
    """cfg_null: count. The null row sees the number of labels asked for and nothing else: two label sets of
    the same size give the same null prediction, sets of other sizes another (once the count has been learned)."""
    torch.manual_seed(0)
    model = build_model("tiny", style, image_size=32, cfg_null="count").eval()
    for name, param in model.named_parameters():  # as if trained: the count vectors are zero at the start
        if "null_count" in name:
            param.data.normal_()
    x, t, drop = torch.randn(1, 3, 32, 32).repeat(3, 1, 1, 1), torch.tensor([500] * 3), torch.ones(3, dtype=torch.bool)
    labels = torch.zeros(3, 24)
    labels[0, [1, 2]] = 1
    labels[1, [7, 20]] = 1  # two other labels
    labels[2, [1, 2, 3]] = 1  # three labels
    with torch.no_grad():
        out = model(x, t, labels, drop=drop)
    assert torch.allclose(out[0], out[1], atol=1e-5)
    assert (out[0] - out[2]).abs().max() > 1e-4
    with pytest.raises(UserError, match="^cfg_null: unknown null condition 'none'"):
        build_model("tiny", style, image_size=32, cfg_null="none")


def test_cross_attn_empty_labels_finite(models, batch):
    model = models["cross_attn"]
    model.zero_grad()
    x, t, _ = batch
    out = model(x, t, torch.zeros(3, 24))
    assert torch.isfinite(out).all()
    out.mean().backward()
    assert torch.isfinite(model.cond.tokens.weight.grad).all()


@pytest.mark.parametrize("style", STYLES)
def test_cfg_scale_one_is_exactly_conditional(models, batch, style):
    x, t, labels = batch
    with torch.no_grad():
        assert torch.equal(guided_prediction(models[style], x, t, labels, 1.0), models[style](x, t, labels))


@pytest.mark.parametrize("style", STYLES)
def test_cfg_scale_three_extrapolates_from_null(models, batch, style):
    x, t, labels = batch
    model = models[style]
    with torch.no_grad():
        cond = model(x, t, labels)
        null = model(x, t, labels, drop=torch.ones(3, dtype=torch.bool))
        guided = guided_prediction(model, x, t, labels, 3.0)
        guided_scalar_t = guided_prediction(model, x, 400, labels, 3.0)
    assert torch.allclose(guided, null + 3 * (cond - null), atol=1e-4)
    assert guided_scalar_t.shape == x.shape


def test_unknown_names_list_the_choices():
    with pytest.raises(UserError, match=r"^unet: unknown UNet variant 'huge'; choose one of: reference, small, "):
        build_model("huge")
    with pytest.raises(UserError, match=r"^conditioning: unknown conditioning style 'film'; choose one of: "
                                        r"time_add, adagn, cross_attn, concat$"):
        build_model("tiny", "film")


def test_bad_overrides_and_image_size_are_user_errors():
    with pytest.raises(UserError, match="^unet_overrides: "):
        build_model("tiny", block_out_channels=(32, 64))  # 2 channels for 3 levels
    with pytest.raises(UserError, match="^unet_overrides: "):
        build_model("tiny", no_such_kwarg=1)
    with pytest.raises(UserError, match="^image_size: 30 is not divisible by 4"):
        build_model("tiny", image_size=30)


@pytest.mark.parametrize("style", STYLES)
def test_patches_run_the_unet_at_a_lower_resolution_and_come_back_as_pixels(style):
    """patch_size 2: the UNet sees (12, 16, 16) for a (3, 32, 32) image and its output is shuffled back,
    so every pixel of a patch is predicted from that patch's own output channels."""
    torch.manual_seed(0)
    model = build_model("tiny", style, image_size=32, patch_size=2)
    cfg = model.unet.config
    assert cfg.sample_size == 16 and cfg.out_channels == 12
    assert cfg.in_channels == (12 + 24 if style == "concat" else 12)
    assert model.build_kwargs["patch_size"] == 2
    seen = {}
    model.unet.register_forward_hook(lambda module, args, out: seen.update(shape=out.sample.shape, out=out.sample))
    x, labels = torch.randn(2, 3, 32, 32), torch.zeros(2, 24)
    labels[:, 3] = 1
    out = model(x, 500, labels)
    assert out.shape == (2, 3, 32, 32) and seen["shape"] == (2, 12, 16, 16)
    assert torch.equal(out[:, :, :2, :2].reshape(2, 12), seen["out"][:, :, 0, 0])  # patch (0, 0) = channels at (0, 0)


def test_a_patch_size_that_does_not_fit_is_a_user_error():
    with pytest.raises(UserError, match="^image_size: 32 is not divisible by the patch size 3$"):
        build_model("tiny", image_size=32, patch_size=3)
    with pytest.raises(UserError, match=r"^image_size: 32 \(2 in patches of 16\) is not divisible by 4 \(3 UNet levels\)$"):
        build_model("tiny", image_size=32, patch_size=16)


def test_overrides_reach_diffusers():
    model = build_model("tiny", "time_add", image_size=32, layers_per_block=2, dropout=0.1)
    assert model.unet.config.layers_per_block == 2 and model.unet.config.dropout == 0.1
    assert model.build_kwargs["dropout"] == 0.1


def test_reference_is_the_course_architecture():
    model = build_model("reference", "time_add")
    assert isinstance(model, ConditionalUNet) and isinstance(model.unet, UNet2DModel)
    cfg = model.unet.config
    assert cfg.sample_size == 64 and cfg.in_channels == 3 and cfg.out_channels == 3
    assert tuple(cfg.block_out_channels) == (128, 128, 256, 256, 512, 512)
    assert cfg.layers_per_block == 2
    assert tuple(cfg.down_block_types) == ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D")
    assert tuple(cfg.up_block_types) == ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4
    assert cfg.class_embed_type == "identity"
    proj = model.cond.proj
    assert isinstance(proj, torch.nn.Linear) and (proj.in_features, proj.out_features) == (24, 512)
    # the label front-end is part of model.parameters() (EMA, optimizer), outside model.unet
    n_unet = sum(p.numel() for p in model.unet.parameters())
    assert sum(p.numel() for p in model.parameters()) == n_unet + 24 * 512 + 512 + 512


def test_style_specific_unet_configs(models):
    adagn = models["adagn"].unet
    assert adagn.config.resnet_time_scale_shift == "scale_shift"
    assert adagn.mid_block.attentions[0].group_norm is not None  # diffusers drops it unless asked
    assert models["concat"].unet.config.in_channels == 3 + 24
    assert models["concat"].unet.config.class_embed_type is None
    assert models["cross_attn"].cond.tokens.weight.shape == (24 + 2, 4 * 32)


def test_width_and_attention_placement_are_keys_not_variants():
    """model.width scales every level's channels (kept a multiple of the GroupNorm groups) and
    model.attention_resolutions puts self-attention on the feature maps of those sizes, whatever the variant."""
    wide = build_model("reference", width=1.5, attention_resolutions=[16, 8]).unet.config
    assert tuple(wide.block_out_channels) == (192, 192, 384, 384, 768, 768)
    assert tuple(wide.down_block_types) == ("DownBlock2D",) * 2 + ("AttnDownBlock2D",) * 2 + ("DownBlock2D",) * 2
    assert tuple(wide.up_block_types) == ("UpBlock2D",) * 2 + ("AttnUpBlock2D",) * 2 + ("UpBlock2D",) * 2
    narrow = build_model("tiny", image_size=32, width=0.5, patch_size=2, attention_resolutions=[16]).unet.config
    assert tuple(narrow.block_out_channels) == (16, 32, 32)  # multiples of tiny's 8 groups
    assert tuple(narrow.down_block_types) == ("AttnDownBlock2D", "DownBlock2D", "DownBlock2D")  # 16 is level 0


def test_cross_attn_follows_the_attention_placement():
    model = build_model("reference", "cross_attn", attention_resolutions=[16, 8])
    cfg = model.unet.config
    assert isinstance(model.unet, UNet2DConditionModel)
    assert tuple(cfg.down_block_types) == ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D",
                                           "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    assert tuple(cfg.up_block_types) == ("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                         "UpBlock2D", "UpBlock2D")
    assert cfg.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert cfg.in_channels == 3 and cfg.out_channels == 3 and cfg.cross_attention_dim == 512
    # same 8-wide heads as UNet2DModel's attention (diffusers calls the head count attention_head_dim here)
    attn = model.unet.down_blocks[2].attentions[0].transformer_blocks[0].attn1
    assert attn.heads == 256 // 8


@pytest.mark.slow
@pytest.mark.parametrize("unet", [u for u in UNETS if u != "tiny"])
def test_every_variant_builds_with_every_style(unet):
    for style in STYLES:
        if conditioning_problem(unet, style):
            with pytest.raises(UserError, match="^conditioning: "):
                build_model(unet, style)
            continue
        model = build_model(unet, style)
        assert sum(p.numel() for p in model.parameters()) > 1_000_000


def test_the_transformer_reads_the_label_tokens_in_every_block(batch):
    """dit: diffusers' PixArtTransformer2DModel on 2x2 patches; every block cross-attends to the label tokens, the
    null and empty sets stay apart, and it takes no other conditioning style nor an attention placement."""
    torch.manual_seed(0)
    model = build_model("dit", "cross_attn", image_size=32, patch_size=2, width=0.5)
    blocks = model.unet.transformer.transformer_blocks
    assert len(blocks) == 8 and all(block.attn2 is not None for block in blocks)
    assert model.unet.config.num_attention_heads == 2 and model.unet.config.sample_size == 16
    x, t, labels = batch
    out = model(x, t, labels, drop=torch.tensor([False, True, False]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert model.cond.tokens.weight.grad.abs().sum() > 0
    with torch.no_grad():
        other = model(x, t, labels.roll(1, dims=0))
        dropped = model(x, t, labels, drop=torch.ones(3, dtype=torch.bool))
        null = model(x, t, torch.zeros(3, 24), drop=torch.ones(3, dtype=torch.bool))
    assert not torch.allclose(model(x, t, labels).detach(), other, atol=1e-4)
    torch.testing.assert_close(dropped, null)  # dropped rows see the null token alone, whatever was asked
    for style in STYLES:
        if style != "cross_attn":
            with pytest.raises(UserError, match="^conditioning: 'dit' reads the labels as tokens"):
                build_model("dit", style, image_size=32, patch_size=2)
    with pytest.raises(UserError, match="attends in every block"):
        from lab.config import load_config
        load_config(Path(__file__).parent.parent / "experiments/ablations/backbone_dit.yaml",
                    ["model.attention_resolutions=[16]"])


@pytest.mark.parametrize("unet, style", [("tiny", "adagn"), ("tiny", "concat"), ("dit", "cross_attn")])
def test_a_self_conditioned_model_reads_an_estimate_of_the_clean_image(unet, style):
    """Three more input channels per patch, the output unchanged in shape; no estimate reads as zeros."""
    torch.manual_seed(0)
    model = build_model(unet, style, image_size=32, patch_size=2, self_conditioning=True,
                        **({"num_layers": 1} if unet == "dit" else {})).eval()
    plain = build_model(unet, style, image_size=32, patch_size=2, **({"num_layers": 1} if unet == "dit" else {}))
    assert model.unet.config.in_channels == plain.unet.config.in_channels + 3 * 4
    assert model.config.self_conditioning and model.build_kwargs["self_conditioning"]
    x, labels = torch.randn(2, 3, 32, 32), torch.zeros(2, 24)
    labels[:, 5] = 1
    with torch.no_grad():
        none, zeros = model(x, 500, labels), model(x, 500, labels, x0_estimate=torch.zeros_like(x))
        estimate = model(x, 500, labels, x0_estimate=torch.rand_like(x))
    assert none.shape == x.shape and torch.equal(none, zeros) and not torch.allclose(none, estimate)
