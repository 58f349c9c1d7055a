"""A CLIP vision tower with a small convolutional stem, registered with transformers' Auto classes.

CLIP embeds each patch with one strided convolution: a linear map of an 8x8 patch. Small
objects (11-15 px) straddle patches, so a tower trained briefly from scratch cannot tell their
shape from one patch. A three-layer stride-2 stem sees ~15 px around each patch for almost no
cost. Everything after the embeddings is CLIP's own code, so the adapter, the attention hooks
and `LlavaForConditionalGeneration` treat this tower exactly like `openai/clip-vit-*`.

Registering the config/model types makes `from_pretrained` on a saved LLaVA or CLIP folder
rebuild this tower; importing `vlmcompress.lvlm` performs the registration.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel


class VlmcVisionConfig(CLIPVisionConfig):
    model_type = "vlmc_clip_vision"

    def __init__(self, stem_layers: int = 3, stem_context: int = 0, **kwargs):
        self.stem_layers = stem_layers
        self.stem_context = stem_context
        super().__init__(**kwargs)


class ConvStemEmbeddings(nn.Module):
    """CLIP-style embeddings whose patch embedding is a small CNN: ``stem_layers`` stride-2
    3x3 convolutions, then ``stem_context`` stride-1 3x3 convolutions on the patch grid (each
    widens a patch's view by two patches, so the shape of a 36 px object is visible from any
    of its patches). Every conv but the last is followed by BatchNorm and GELU: without the
    normalisation the tower needed several times more steps to tell shapes apart.

    ``pixel_values [B, 3, H, W]`` -> ``[B, 1 + (H/p)(W/p), D]`` (CLS first), like CLIP's.
    Fixed input size (no position interpolation): the embedded model is trained at one size.
    """

    def __init__(self, config: VlmcVisionConfig):
        super().__init__()
        n, c, d = config.stem_layers, config.stem_context, config.hidden_size
        if 2 ** n != config.patch_size:
            raise ValueError(f"stem_layers={n} gives stride {2 ** n}, but patch_size={config.patch_size}")
        self.image_size, self.patch_size = config.image_size, config.patch_size
        widths = [config.num_channels] + [d // 2 ** (n - 1 - i) for i in range(n)] + [d] * c
        strides = [2] * n + [1] * c
        layers: list[nn.Module] = []
        for i, stride in enumerate(strides):
            layers.append(nn.Conv2d(widths[i], widths[i + 1], 3, stride=stride, padding=1))
            if i < len(strides) - 1:
                layers += [nn.BatchNorm2d(widths[i + 1]), nn.GELU()]
        self.stem = nn.Sequential(*layers)
        num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.class_embedding = nn.Parameter(torch.randn(d) * config.initializer_range)
        self.position_embedding = nn.Embedding(num_positions, d)
        nn.init.normal_(self.position_embedding.weight, std=config.initializer_range)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        b, _, h, w = pixel_values.shape
        if interpolate_pos_encoding or h != self.image_size or w != self.image_size:
            raise ValueError(f"input image size ({h}*{w}) must be the model's ({self.image_size}*{self.image_size})")
        x = self.stem(pixel_values.to(self.stem[0].weight.dtype))        # [B, D, H/p, W/p]
        patches = x.flatten(2).transpose(1, 2)
        emb = torch.cat([self.class_embedding.expand(b, 1, -1), patches], dim=1)
        # The table itself, not a position-id buffer: transformers does not restore
        # non-persistent buffers of custom modules on `from_pretrained`.
        return emb + self.position_embedding.weight.unsqueeze(0)


class VlmcVisionModel(CLIPVisionModel):
    config_class = VlmcVisionConfig
    _input_embed_layer = "stem"

    def __init__(self, config: VlmcVisionConfig):
        super().__init__(config)
        self.embeddings = ConvStemEmbeddings(config)
        self.post_init()


class VlmcCLIPConfig(CLIPConfig):
    model_type = "vlmc_clip"
    sub_configs = {"text_config": CLIPConfig.sub_configs["text_config"], "vision_config": VlmcVisionConfig}

    def __init__(self, text_config=None, vision_config=None, **kwargs):
        if isinstance(vision_config, dict):
            vision_config = VlmcVisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
        super().__init__(text_config=text_config, vision_config=vision_config, **kwargs)
        if not isinstance(self.vision_config, VlmcVisionConfig):
            self.vision_config = VlmcVisionConfig(**self.vision_config.to_dict())


class VlmcCLIPModel(CLIPModel):
    """`CLIPModel` whose vision tower is :class:`VlmcVisionModel` (same keys elsewhere)."""

    config_class = VlmcCLIPConfig

    def __init__(self, config: VlmcCLIPConfig):
        super().__init__(config)
        self.vision_model = VlmcVisionModel._from_config(config.vision_config)
        self.post_init()


def register() -> None:
    """Idempotently register the custom types with the Auto classes."""
    for cfg, model in ((VlmcVisionConfig, VlmcVisionModel), (VlmcCLIPConfig, VlmcCLIPModel)):
        try:
            AutoConfig.register(cfg.model_type, cfg)
        except ValueError:
            pass  # already registered in this process
        try:
            AutoModel.register(cfg, model)
        except ValueError:
            pass


register()
