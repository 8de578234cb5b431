"""The label front-ends of the conditioning styles (lab/model_zoo.py names them), around diffusers' own UNets
(UNet2DModel, UNet2DConditionModel), and classifier-free guidance. Every style has a learned NULL condition,
distinct from the empty label set (i-CLEVR has no empty scenes, but "no labels" is still a valid input and CFG
must not confuse it with "unconditional").

    model = lab.model_zoo.build_model("small", "adagn")                  # a ConditionalUNet
    eps = model(x, t, labels, drop=torch.rand(B) < p_uncond)             # training, with label dropout
    eps = guided_prediction(model, x, t, labels, guidance_scale=2.0)     # sampling
"""

import torch
from diffusers import ConfigMixin, ModelMixin, PixArtTransformer2DModel, UNet2DConditionModel, UNet2DModel
from diffusers.configuration_utils import register_to_config
from torch import nn


class CountEmbedding(nn.Module):
    """A learned vector per number of labels asked for, zero at the start: what a counted null adds, so that
    classifier-free guidance contrasts the labels with "some scene of as many objects" rather than with "any
    scene". With the plain null, guidance also pushes a one-object prompt away from the unconditional mean of
    about two objects, towards an empty floor."""

    def __init__(self, num_labels, dim):
        super().__init__()
        self.table = nn.Embedding(num_labels + 1, dim)
        nn.init.zeros_(self.table.weight)

    def forward(self, labels):
        return self.table(labels.sum(1).round().long().clamp(0, self.table.num_embeddings - 1))


def _time_embed_dim(cfg):
    return cfg.get("time_embedding_dim") or 4 * cfg["block_out_channels"][0]  # diffusers' own default


class TimeAdd(nn.Module):
    """(a) The reference: Linear(multi-hot) is added to the time embedding (class_embed_type="identity")."""

    @staticmethod
    def build_unet(cfg, num_labels):
        return UNet2DModel(**cfg, class_embed_type="identity")

    def __init__(self, unet, num_labels, counted_null=False):
        super().__init__()
        dim = unet.time_embedding.linear_2.out_features
        self.proj = nn.Linear(num_labels, dim)
        # The empty set embeds to proj.bias; the null is a separate vector, so CFG's "unconditional" is its own thing.
        self.null = nn.Parameter(torch.randn(dim) * 0.02)
        self.null_count = CountEmbedding(num_labels, dim) if counted_null else None

    def forward(self, x, labels, drop):
        emb = self.proj(labels)
        if drop is not None:
            null = self.null if self.null_count is None else self.null + self.null_count(labels)
            emb = torch.where(drop[:, None], null.to(emb.dtype), emb)
        return x, {"class_labels": emb}


class AdaGN(TimeAdd):
    """(b) Same embedding as time_add, but every resnet turns time+label into GroupNorm scale and shift."""

    @staticmethod
    def build_unet(cfg, num_labels):
        cfg = {"resnet_time_scale_shift": "scale_shift", **cfg}
        # Quirk: with scale_shift, UNet2DModel's mid-block attention silently drops its GroupNorm unless
        # attn_norm_num_groups is given; keep it so only the resnets differ from time_add.
        cfg.setdefault("attn_norm_num_groups", cfg.get("norm_num_groups", 32))
        return UNet2DModel(**cfg, class_embed_type="identity")


_CROSS_ATTN_BLOCKS = {"AttnDownBlock2D": "CrossAttnDownBlock2D", "AttnUpBlock2D": "CrossAttnUpBlock2D",
                      "UNetMidBlock2D": "UNetMidBlock2DCrossAttn"}


class CrossAttn(nn.Module):
    """(c) One learned token per present label, read by cross-attention at the variant's attention levels.

    Tokens: num_labels label tokens, one always-attended token (so the empty set has something to attend to and
    stays finite) and one null token, which alone is visible for dropped rows (with a counted null, beside one
    of num_labels + 1 count tokens).
    """

    @staticmethod
    def build_unet(cfg, num_labels):
        cfg = dict(cfg)
        if cfg.pop("transformer", False):
            return LabelTokenTransformer(cfg)

        def swap(names):  # same attention placement, cross-attention flavour
            return tuple(_CROSS_ATTN_BLOCKS.get(n, n) for n in names)

        cfg["down_block_types"] = swap(cfg["down_block_types"])
        cfg["up_block_types"] = swap(cfg["up_block_types"])
        cfg["mid_block_type"] = swap([cfg.get("mid_block_type", "UNetMidBlock2D")])[0]
        # Quirk: UNet2DConditionModel's "attention_head_dim" is really the number of heads (diffusers issue 2011).
        # Convert UNet2DModel's per-head dim to per-level head counts so both styles get the same head size.
        head_dim = cfg.pop("attention_head_dim", 8)
        cfg["attention_head_dim"] = tuple(1 if head_dim is None else max(1, c // head_dim)
                                          for c in cfg["block_out_channels"])
        cfg.setdefault("cross_attention_dim", _time_embed_dim(cfg))
        return UNet2DConditionModel(**cfg)

    def __init__(self, unet, num_labels, counted_null=False):
        super().__init__()
        counts = num_labels + 1 if counted_null else 0
        # [labels..., always, null, counts 0..num_labels]
        self.tokens = nn.Embedding(num_labels + 2 + counts, unet.config.cross_attention_dim)
        self.num_labels, self.counted_null = num_labels, counted_null

    def forward(self, x, labels, drop):
        b, n = labels.shape[0], self.num_labels
        on = torch.ones(b, 1, dtype=torch.bool, device=labels.device)
        mask = torch.cat([labels > 0.5, on, ~on], dim=1)
        if self.counted_null:
            mask = torch.cat([mask, torch.zeros(b, n + 1, dtype=torch.bool, device=labels.device)], dim=1)
        if drop is not None:
            null_only = torch.zeros_like(mask)
            null_only[:, n + 1] = True
            if self.counted_null:
                null_only[torch.arange(b), n + 2 + labels.sum(1).round().long().clamp(0, n)] = True
            mask = torch.where(drop[:, None], null_only, mask)
        states = self.tokens.weight.expand(b, -1, -1)
        return x, {"encoder_hidden_states": states, "encoder_attention_mask": mask}


class LabelTokenTransformer(nn.Module):
    """diffusers' PixArtTransformer2DModel called as the UNets are, (x, t, tokens, mask) -> .sample: one patch per
    pixel of its input (ConditionalUNet has patched the image already), the label tokens at the model's width."""

    def __init__(self, cfg):
        super().__init__()
        width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        self.transformer = PixArtTransformer2DModel(**{"patch_size": 1, "cross_attention_dim": width,
                                                       "caption_channels": None, "use_additional_conditions": False,
                                                       **cfg})
        self.config = self.transformer.config

    def forward(self, x, t, encoder_hidden_states, encoder_attention_mask):
        return self.transformer(x, encoder_hidden_states, timestep=t, encoder_attention_mask=encoder_attention_mask,
                                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


class Concat(nn.Module):
    """(d) The multi-hot vector broadcast to (num_labels, H, W) maps and concatenated to the input channels."""

    @staticmethod
    def build_unet(cfg, num_labels):
        return UNet2DModel(**{**cfg, "in_channels": cfg["in_channels"] + num_labels})

    def __init__(self, unet, num_labels, counted_null=False):
        super().__init__()
        # Starts at -1, outside the {0, 1} label range, so it is distinct from every label set incl. the empty one.
        self.null = nn.Parameter(torch.full((num_labels,), -1.0))
        self.null_count = CountEmbedding(num_labels, num_labels) if counted_null else None

    def forward(self, x, labels, drop):
        cond = labels.to(x.dtype)
        if drop is not None:
            null = self.null if self.null_count is None else self.null + self.null_count(labels)
            cond = torch.where(drop[:, None], null.to(x.dtype), cond)
        maps = cond[:, :, None, None].expand(-1, -1, *x.shape[-2:])
        return torch.cat([x, maps], dim=1), {}


FRONT_ENDS = {style.__name__: style for style in (TimeAdd, AdaGN, CrossAttn, Concat)}  # lab.model_zoo names them


class ConditionalUNet(ModelMixin, ConfigMixin):
    """A diffusers UNet (`.unet`) plus the label front-end of one conditioning style (`.cond`), itself a diffusers
    model: `save_pretrained` writes its config and weights, `from_pretrained` builds it back. Built by
    lab.model_zoo.build_model, which resolves the zoo's names into `front_end` and `unet_kwargs`; `zoo` records
    those names (the config of a run that trained it).

    With patch_size p > 1 the UNet works on p x p patches (pixel unshuffle: (3, H, W) -> (3p^2, H/p, W/p)) and
    its output is shuffled back: every convolution runs at 1/p^2 of the pixels, so on a CPU budget the same
    compute buys a wider network (the first layer of "simple diffusion" and U-ViT's patches).

    With self_conditioning the backbone takes 3 more input channels (per patch): an estimate of the clean image
    (lab.diffusion), zeros when none is given."""

    @register_to_config
    def __init__(self, front_end: str, unet_kwargs: dict, num_labels: int = 24, patch_size: int = 1,
                 counted_null: bool = False, zoo: dict = None, self_conditioning: bool = False):
        super().__init__()
        style = FRONT_ENDS[front_end]
        self.unet = style.build_unet(dict(unet_kwargs), num_labels)
        self.cond = style(self.unet, num_labels, counted_null=counted_null)
        self.patch_size = patch_size

    @property
    def build_kwargs(self):
        """What lab.model_zoo.build_model was called with."""
        return self.config.zoo

    def forward(self, x, t, labels, drop=None, x0_estimate=None):
        """x (B,3,H,W), t scalar or (B,), labels (B,num_labels) float multi-hot; drop (B,) bool -> null condition;
        x0_estimate (B,3,H,W) for a self-conditioned model (None: zeros), ignored by others."""
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if self.config.self_conditioning:
            x = torch.cat([x, torch.zeros_like(x) if x0_estimate is None else x0_estimate.to(x.dtype)], dim=1)
        x = nn.functional.pixel_unshuffle(x, self.patch_size) if self.patch_size > 1 else x
        x, kwargs = self.cond(x, labels.to(x.device, torch.float32), drop)
        out = self.unet(x, t, **kwargs).sample
        return nn.functional.pixel_shuffle(out, self.patch_size) if self.patch_size > 1 else out


def guided_prediction(model, x, t, labels, guidance_scale: float, x0_estimate=None) -> torch.Tensor:
    """CFG as ONE doubled batch: cond and null rows together; pred = null + s*(cond - null). x0_estimate: a
    self-conditioned model's estimate of the clean image, the same for both halves.

    Scale 1 returns exactly the conditional prediction and skips the null half entirely.
    """
    extra = {} if x0_estimate is None else {"x0_estimate": x0_estimate}
    if guidance_scale == 1:
        return model(x, t, labels, **extra)
    b = x.shape[0]
    t = torch.as_tensor(t, device=x.device)
    t = t.expand(b) if t.ndim == 0 else t
    drop = torch.arange(2 * b, device=x.device) >= b
    if x0_estimate is not None:
        extra = {"x0_estimate": torch.cat([x0_estimate, x0_estimate])}
    cond, null = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, labels]), drop=drop,
                       **extra).chunk(2)
    return null + guidance_scale * (cond - null)
