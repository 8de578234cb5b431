"""The model zoo: UNet variants (and a transformer) x label-conditioning styles for conditional DDPMs on i-CLEVR
(multi-hot labels, 24 classes), as plain data, and `build_model`, which makes one.

    model = build_model("small", "adagn")        # a lab.conditioning.ConditionalUNet around a diffusers UNet
    model = build_model("dit", "cross_attn", image_size=32, patch_size=2)   # a transformer on 2x2 patches

The backbones are diffusers' own (UNet2DModel, UNet2DConditionModel, PixArtTransformer2DModel), given as their
kwargs; each conditioning style adds a small label front-end (lab/conditioning.py). Width and attention
placement are config keys (`model.width`, `model.attention_resolutions`) rather than more variants, so the UNet
ablations mean the same at every scale. Nothing here loads torch, so that a config is checked (`--dry-run`)
against the zoo without it; torch and diffusers load when a model is built.
"""
import importlib

from lab.errors import UserError, choose

# UNet2DModel kwargs per variant; sample_size comes from build_model(image_size=...). Resolutions in the comments
# assume 64x64 input; every level but the last halves the resolution.
UNETS = {
    # The course reference (~114M params with time_add): attention only at 4x4 (+ the mid block's at 2x2).
    "reference": dict(
        block_out_channels=(128, 128, 256, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    ),
    # 4 levels 64->8, attention at 16x16 (+ mid at 8x8): a quick baseline.
    "small": dict(
        block_out_channels=(64, 128, 128, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    ),
    # The CPU presets' UNet (4.4M params with time_add): 3 levels, attention at the lowest one, made for 32x32
    # images in 2x2 patches (model.patch_size 2: a 16x16 -> 4x4 UNet), so that a CPU's minutes buy more images.
    "cpu": dict(
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ),
    # A transformer on the model's patches (DiT with PixArt-alpha's adaLN-single: diffusers'
    # PixArtTransformer2DModel): the timestep modulates every block's LayerNorms, every block reads the label
    # tokens by cross-attention (so it takes the cross_attn style). model.width scales the heads.
    "dit": dict(transformer=True, num_layers=8, num_attention_heads=4, attention_head_dim=32),
    # CPU-sized for tests: 3 levels, attention at the lowest one; 8 groups because 32 channels.
    "tiny": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ),
}


def feature_sizes(cfg, image_size, patch_size=1):
    """The feature-map size at each level of a UNet with kwargs `cfg` (every level but the last halves it)."""
    return [image_size // patch_size // 2 ** level for level in range(len(cfg["block_out_channels"]))]


def unet_kwargs(unet, image_size, patch_size=1, width=1.0, attention_resolutions=None, overrides=None):
    """UNETS[unet] resolved for a model: channels times `width` (kept a multiple of the variant's GroupNorm
    groups), self-attention at the feature-map sizes in `attention_resolutions` (the UNet's own sizes, after
    patching; None: the variant's placement), then `overrides`. So an ablation such as `model.width: 1.5`
    means the same thing at every scale: 1.5x the channels of whatever UNet the preset uses."""
    cfg = dict(UNETS[unet])
    if cfg.get("transformer"):
        if width != 1:  # more heads of the same size
            cfg["num_attention_heads"] = max(1, round(cfg["num_attention_heads"] * width))
        return {**cfg, **(overrides or {})}
    groups = cfg.get("norm_num_groups", 32)
    if width != 1:
        cfg["block_out_channels"] = tuple(max(groups, round(c * width / groups) * groups)
                                          for c in cfg["block_out_channels"])
    if attention_resolutions is not None:
        attends = [size in attention_resolutions for size in feature_sizes(cfg, image_size, patch_size)]
        cfg["down_block_types"] = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attends)
        cfg["up_block_types"] = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends))
    return {**cfg, **(overrides or {})}


def attention_problem(unet, image_size, patch_size, attention_resolutions, overrides=None):
    """Why `attention_resolutions` names a size that no level of the UNet has, or None."""
    if unet not in UNETS or not attention_resolutions:
        return None
    if UNETS[unet].get("transformer"):
        return f"'{unet}' attends in every block; attention_resolutions places a UNet's attention"
    sizes = feature_sizes({**UNETS[unet], **(overrides or {})}, image_size, patch_size)
    unknown = sorted(set(attention_resolutions) - set(sizes))
    return f"{unknown} not among this UNet's feature-map sizes {sizes}" if unknown else None


def size_problem(unet, image_size, overrides=None, patch_size=1):
    """Why the UNet cannot take `image_size` in patches of `patch_size` (the UNet sees image_size / patch_size,
    and every level but the last halves it), or None."""
    if image_size % patch_size:
        return f"{image_size} is not divisible by the patch size {patch_size}"
    if UNETS.get(unet, {}).get("transformer"):
        return None  # one resolution throughout
    try:
        levels = len({**UNETS[unet], **(overrides or {})}["block_out_channels"])
    except (KeyError, TypeError):
        return None  # an unknown variant or malformed overrides: reported where the model is built
    if (image_size // patch_size) % 2 ** (levels - 1):
        inside = f" ({image_size // patch_size} in patches of {patch_size})" if patch_size > 1 else ""
        return f"{image_size}{inside} is not divisible by {2 ** (levels - 1)} ({levels} UNet levels)"
    return None


# Conditioning style -> its front-end class in lab/conditioning.py (named, so that the zoo loads no torch).
CONDITIONING = {
    "time_add": "TimeAdd",      # (a) the reference: Linear(multi-hot) added to the time embedding
    "adagn": "AdaGN",           # (b) the same embedding as GroupNorm scale and shift in every resnet
    "cross_attn": "CrossAttn",  # (c) a learned token per present label, read by cross-attention
    "concat": "Concat",         # (d) the multi-hot vector as extra input channels
}


def conditioning_problem(unet, conditioning):
    """Why the backbone cannot take the conditioning style, or None: a transformer reads labels as tokens only."""
    if UNETS.get(unet, {}).get("transformer") and conditioning != "cross_attn":
        return f"'{unet}' reads the labels as tokens in every block: it takes model.conditioning: cross_attn"
    return None


# The null condition of classifier-free guidance: one learned null, or the null plus the number of labels asked for.
CFG_NULLS = {"learned": False, "count": True}


def build_model(unet: str = "reference", conditioning: str = "time_add", num_labels: int = 24,
                image_size: int = 64, patch_size: int = 1, width: float = 1.0, attention_resolutions=None,
                cfg_null: str = "learned", self_conditioning: bool = False, **unet_overrides):
    """Build UNETS[unet] with CONDITIONING[conditioning] on patch_size x patch_size patches of the image, its
    channels times `width`, self-attention at `attention_resolutions` (unet_kwargs), reading an x0 estimate too
    with `self_conditioning`; unet_overrides replace UNet2DModel kwargs of the variant."""
    choose("unet", "UNet variant", unet, UNETS)
    # RGB in and out (per patch), spelled out because UNet2DConditionModel defaults to 4 (latent) channels.
    channels = 3 * patch_size ** 2
    cfg = {"in_channels": channels * (2 if self_conditioning else 1), "out_channels": channels,
           **unet_kwargs(unet, image_size, patch_size, width, attention_resolutions, unet_overrides),
           "sample_size": image_size // patch_size}
    front_end = choose("conditioning", "conditioning style", conditioning, CONDITIONING)
    counted = choose("cfg_null", "null condition", cfg_null, CFG_NULLS)
    problem = size_problem(unet, image_size, unet_overrides, patch_size)
    if problem:
        raise UserError("image_size", problem)
    problem = conditioning_problem(unet, conditioning)
    if problem:
        raise UserError("conditioning", problem)
    zoo = dict(unet=unet, conditioning=conditioning, num_labels=num_labels, image_size=image_size,
               patch_size=patch_size, width=width, attention_resolutions=attention_resolutions, cfg_null=cfg_null,
               self_conditioning=self_conditioning, **unet_overrides)
    # torch and diffusers load here, when a model is built: the zoo above is read without them
    conditioning_module = importlib.import_module("lab.conditioning")
    try:
        return conditioning_module.ConditionalUNet(front_end, cfg, num_labels, patch_size, counted, zoo,
                                                   self_conditioning)
    except (TypeError, ValueError) as e:  # diffusers validates the kwargs; report it as the user's config error
        raise UserError("unet_overrides" if unet_overrides else "unet", str(e)) from e
