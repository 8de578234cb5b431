"""UNet variants as plain data: diffusers UNet2DModel kwargs per name, and the image sizes each can take.
No torch here, so a config's UNet is checked (`--dry-run`) without loading it; lab/model_zoo.py builds them.
"""

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
    # The reference layout at 1.5x width (~2.2x params): isolates width from depth and attention placement.
    "wide": dict(
        block_out_channels=(192, 192, 384, 384, 768, 768),
        layers_per_block=2,
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    ),
    # The reference channels with attention moved from 4x4 to 16x16 and 8x8, where object positions are resolved.
    "attn_16_8": dict(
        block_out_channels=(128, 128, 256, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownBlock2D",) * 2 + ("AttnDownBlock2D",) * 2 + ("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2 + ("AttnUpBlock2D",) * 2 + ("UpBlock2D",) * 2,
    ),
    # CPU-sized for tests and quickstarts: 3 levels, attention at the lowest one; 8 groups because 32 channels.
    "tiny": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ),
}


def size_problem(unet, image_size, overrides=None):
    """Why the UNet cannot take `image_size` (every level but the last halves it), or None."""
    try:
        levels = len({**UNETS[unet], **(overrides or {})}["block_out_channels"])
    except (KeyError, TypeError):
        return None  # an unknown variant or malformed overrides: reported where the model is built
    if image_size % 2 ** (levels - 1):
        return f"{image_size} is not divisible by {2 ** (levels - 1)} ({levels} UNet levels)"
    return None
