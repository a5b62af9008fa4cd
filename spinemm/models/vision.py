"""Vision towers: open_clip's native ViT and timm backbones as :class:`SliceEncoder` s.

Every tower folds slices into the batch (``[N, S, C, H, W] -> [N*S, C, H, W]``), normalises with its
own mean/std, and returns patch tokens plus a pooled embedding per slice. The open_clip image
projection (pooled width -> embed dim) is split off with :meth:`pop_projection` so the model owns
it as ``image_proj`` (the dual-encoder path); pretrained CLIP alignment is kept that way.

Builders registered here: ``"open_clip"`` (a built-in open_clip name with a pretrained tag, an
``hf-hub:`` open_clip model such as BiomedCLIP, or a custom ViT given by ``open_clip_cfg``) and
``"timm"`` (any timm model: ViT tokens or CNN feature maps).
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SpineModelError
from .attention import convert_multihead_attention
from .base import SliceEncoder
from .config import VisionConfig
from .hub import TOKENIZER_FILES, TOKENIZER_REQUIRED, load_upstream_state_dict, resolve_files
from .registry import BuildContext, register_vision

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HF_HUB_PREFIX = "hf-hub:"
#: open_clip's weight files on the hub, safetensors preferred.
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _fold(series: torch.Tensor) -> torch.Tensor:
    if series.ndim != 5:
        raise SpineModelError(f"expected a series batch [N, S, C, H, W], got shape {tuple(series.shape)}")
    return series.flatten(0, 1)


class OpenCLIPViTEncoder(SliceEncoder):
    """open_clip's native ``VisionTransformer``: CLS-pooled embedding + patch tokens per slice."""

    def __init__(
        self,
        visual: nn.Module,
        image_mean: tuple[float, ...],
        image_std: tuple[float, ...],
        convert_attention: bool = True,
    ) -> None:
        super().__init__()
        if visual.attn_pool is not None:
            raise SpineModelError("open_clip towers with an attentional pooler (CoCa) give no patch tokens")
        proj = visual.proj  # [width, embed_dim] parameter; becomes the model's image_proj
        self._projection: nn.Module | None = None
        if proj is not None:
            self._projection = nn.Linear(proj.shape[0], proj.shape[1], bias=False)
            with torch.no_grad():
                self._projection.weight.copy_(proj.T)
        visual.proj = None  # forward now returns the pooled width-dim feature...
        visual.output_tokens = True  # ...and the patch tokens (CLS dropped)
        if convert_attention:
            convert_multihead_attention(visual)
        self.visual = visual
        self.width = visual.transformer.width
        self.grid_size = tuple(visual.grid_size)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)

    def pop_projection(self) -> nn.Module | None:
        """Hand the pretrained image projection to the model (once)."""
        proj, self._projection = self._projection, None
        return proj

    def forward(self, series: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """series [N, S, C, H, W] in [0, 1] -> (tokens [N, S, h*w, width], pooled [N, S, width])."""
        n, s = series.shape[:2]
        pooled, tokens = self.visual(self.normalize(_fold(series)))
        return tokens.unflatten(0, (n, s)), pooled.unflatten(0, (n, s))


class TimmEncoder(SliceEncoder):
    """A timm backbone (``trunk``): ViT tokens without the prefix tokens, or a CNN's last feature map."""

    def __init__(
        self,
        trunk: nn.Module,
        image_size: int,
        image_mean: tuple[float, ...],
        image_std: tuple[float, ...],
        projection: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.width = trunk.num_features
        self.num_prefix_tokens = int(getattr(trunk, "num_prefix_tokens", 0))
        patch_embed = getattr(trunk, "patch_embed", None)
        if patch_embed is not None and getattr(patch_embed, "grid_size", None) is not None:
            self.grid_size = tuple(patch_embed.grid_size)
        else:  # CNN: the last stage's stride sets the grid
            reduction = trunk.feature_info[-1]["reduction"]
            side = -(-image_size // reduction)  # stride-2 layers round up on odd sizes
            self.grid_size = (side, side)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self._projection = projection

    def pop_projection(self) -> nn.Module | None:
        """Hand a pretrained image projection (open_clip's TimmModel head) to the model (once)."""
        proj, self._projection = self._projection, None
        return proj

    def forward(self, series: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """series [N, S, C, H, W] in [0, 1] -> (tokens [N, S, h*w, width], pooled [N, S, width])."""
        n, s = series.shape[:2]
        features = self.trunk.forward_features(self.normalize(_fold(series)))
        pooled = self.trunk.forward_head(features, pre_logits=True)  # timm's own pooling: CLS or avg
        if features.ndim == 4:  # CNN map [N*S, C, h, w] -> tokens [N*S, h*w, C]
            tokens = features.flatten(2).transpose(1, 2)
        else:  # ViT [N*S, prefix + h*w, C]
            tokens = features[:, self.num_prefix_tokens :]
        return tokens.unflatten(0, (n, s)), pooled.unflatten(0, (n, s))


# ----------------------------------------------------------------------------------------- builders


def open_clip_files(
    source: str, *, config: bool, weights: bool, tokenizer: bool = False, setting: str
) -> dict[str, Path]:
    """Files of an open_clip hub model (or a local folder): ``open_clip_config.json``, weights and
    tokenizer, asked for in one go so an offline error lists all of them."""
    files: list = (["open_clip_config.json"] if config else []) + ([OPEN_CLIP_WEIGHTS] if weights else [])
    if tokenizer:
        files.append(TOKENIZER_REQUIRED)
    return resolve_files(source, files, optional=TOKENIZER_FILES if tokenizer else (), setting=setting)


def upstream_state(ctx: BuildContext, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an upstream checkpoint, loaded once per build (both towers may need it)."""
    return ctx.cached(("state", str(path)), lambda: load_upstream_state_dict(path))


def open_clip_source(name: str, pretrained: str | bool | None) -> str:
    """Where an open_clip model's files come from: a local override, else its repo id (or folder)."""
    return pretrained if isinstance(pretrained, str) else name.removeprefix(HF_HUB_PREFIX)


def _resolve_open_clip(
    cfg: VisionConfig, ctx: BuildContext
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """(open_clip model config, upstream state dict or None); fills cfg.open_clip_cfg/mean/std."""
    if cfg.model_name is None:
        if cfg.open_clip_cfg is None:
            raise SpineModelError("vision.type 'open_clip' needs vision.model_name or vision.open_clip_cfg")
        return cfg.open_clip_cfg, None
    if cfg.model_name.startswith(HF_HUB_PREFIX):
        return _resolve_hub_model(cfg, ctx)
    return _resolve_builtin(cfg, ctx)


def _resolve_hub_model(
    cfg: VisionConfig, ctx: BuildContext
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """``hf-hub:org/repo`` (e.g. BiomedCLIP): config and weights from the repo or a local copy."""
    source = open_clip_source(cfg.model_name, cfg.pretrained)
    need_config = cfg.open_clip_cfg is None
    want_weights = ctx.load_pretrained and cfg.pretrained is not False
    if not (need_config or want_weights):
        return cfg.open_clip_cfg, None
    found = open_clip_files(source, config=need_config, weights=want_weights, setting="vision.pretrained")
    if need_config:
        hub = json.loads(found["open_clip_config.json"].read_text())
        model_cfg, pre = hub["model_cfg"], hub.get("preprocess_cfg", {})
        cfg.open_clip_cfg = {
            k: model_cfg[k] for k in ("embed_dim", "quick_gelu", "vision_cfg") if k in model_cfg
        }
        cfg.mean = cfg.mean or tuple(pre.get("mean", OPENAI_MEAN))
        cfg.std = cfg.std or tuple(pre.get("std", OPENAI_STD))
    state = upstream_state(ctx, found[OPEN_CLIP_WEIGHTS[0]]) if want_weights else None
    return cfg.open_clip_cfg, state


def _resolve_builtin(
    cfg: VisionConfig, ctx: BuildContext
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """A built-in open_clip name; ``pretrained`` is a tag (``"openai"``) or a local weights path."""
    import open_clip

    name, tag = cfg.model_name, cfg.pretrained
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise SpineModelError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
    oc = {
        "embed_dim": model_cfg["embed_dim"],
        "quick_gelu": model_cfg.get("quick_gelu", False),
        "vision_cfg": model_cfg["vision_cfg"],
    }
    pcfg = open_clip.get_pretrained_cfg(name, tag) if isinstance(tag, str) else {}
    if pcfg:  # a known tag: its activation and normalisation are part of the weights
        oc["quick_gelu"] = bool(pcfg.get("quick_gelu", oc["quick_gelu"]))
        cfg.mean, cfg.std = cfg.mean or tuple(pcfg["mean"]), cfg.std or tuple(pcfg["std"])
    elif isinstance(tag, str) and not Path(tag).expanduser().exists():
        raise SpineModelError(
            f"vision.pretrained={tag!r} is neither an open_clip tag of {name} "
            f"({open_clip.list_pretrained_tags_by_model(name)}) nor a local path"
        )
    cfg.open_clip_cfg = cfg.open_clip_cfg or oc
    if not (ctx.load_pretrained and isinstance(tag, str)):
        return cfg.open_clip_cfg, None
    source, files = tag, OPEN_CLIP_WEIGHTS  # a local file or folder
    if pcfg:
        if not pcfg.get("hf_hub"):
            raise SpineModelError(
                f"open_clip weights {name}/{tag} have no hub copy; download {pcfg.get('url')} "
                f"and set vision.pretrained to that file"
            )
        source, filename = _split_hub(pcfg["hf_hub"])
        files = (filename,) if filename else OPEN_CLIP_WEIGHTS
    path = resolve_files(source, [files], setting="vision.pretrained")[files[0]]
    return cfg.open_clip_cfg, upstream_state(ctx, path)


def _split_hub(hf_hub: str) -> tuple[str, str]:
    """open_clip's ``"org/repo/"`` or ``"org/repo/file.bin"`` -> (repo id, file name or "")."""
    org, repo, *rest = hf_hub.split("/")
    return f"{org}/{repo}", "/".join(p for p in rest if p)


@register_vision("open_clip")
def build_open_clip_vision(cfg: VisionConfig, ctx: BuildContext) -> SliceEncoder:
    """open_clip visual tower from ``cfg`` (see :class:`~spinemm.models.config.VisionConfig`)."""
    from open_clip.model import (  # the tower builder open_clip uses itself
        _build_vision_tower,
        resize_pos_embed,
    )
    from open_clip.timm_model import TimmModel

    oc, state = _resolve_open_clip(cfg, ctx)
    if state is not None and oc.get("embed_dim", ctx.embed_dim) != ctx.embed_dim:
        raise SpineModelError(
            f"pretrained vision tower projects to {oc['embed_dim']} dims but embed_dim is {ctx.embed_dim}; "
            f"set embed_dim={oc['embed_dim']}"
        )
    vision_cfg = dict(oc["vision_cfg"], image_size=cfg.image_size)
    visual = _build_vision_tower(ctx.embed_dim, vision_cfg, quick_gelu=bool(oc.get("quick_gelu", False)))
    if state is not None:
        visual_state = {k: v for k, v in state.items() if k.startswith("visual.")}
        resize_pos_embed(visual_state, types.SimpleNamespace(visual=visual))  # other image sizes than trained
        try:
            visual.load_state_dict({k[len("visual.") :]: v for k, v in visual_state.items()})
        except RuntimeError as exc:
            raise SpineModelError(
                f"pretrained open_clip weights do not fit vision tower {cfg.model_name}: {exc}"
            ) from exc
    mean, std = cfg.mean or OPENAI_MEAN, cfg.std or OPENAI_STD
    cfg.mean, cfg.std = tuple(mean), tuple(std)
    if isinstance(visual, TimmModel):
        head, visual.head = visual.head, nn.Identity()
        return TimmEncoder(visual.trunk, cfg.image_size, mean, std, projection=head)
    if not hasattr(visual, "transformer"):
        raise SpineModelError(
            f"open_clip tower {type(visual).__name__} gives no patch tokens; use a ViT or timm tower"
        )
    return OpenCLIPViTEncoder(visual, mean, std, convert_attention=cfg.convert_attention)


@register_vision("timm")
def build_timm_vision(cfg: VisionConfig, ctx: BuildContext) -> SliceEncoder:
    """Any timm backbone by name (``vision.model_name``); ``vision.kwargs`` go to ``timm.create_model``."""
    import timm

    if not cfg.model_name:
        raise SpineModelError("vision.type 'timm' needs vision.model_name (a timm model name)")
    kwargs: dict[str, Any] = dict(cfg.kwargs)
    if ctx.load_pretrained and cfg.pretrained not in (None, False):
        if isinstance(cfg.pretrained, str):
            source = cfg.pretrained
        else:
            pretrained_cfg = timm.models.get_pretrained_cfg(cfg.model_name)
            source = pretrained_cfg.hf_hub_id if pretrained_cfg is not None else None
            if not source:
                raise SpineModelError(
                    f"timm model {cfg.model_name!r} has no hub weights; set vision.pretrained to a file"
                )
        files = ("model.safetensors", "pytorch_model.bin")
        path = resolve_files(source, [files], setting="vision.pretrained")[files[0]]
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    try:  # ViT-style trunks must be built at our image size (their position grid depends on it)
        trunk = timm.create_model(cfg.model_name, num_classes=0, **{"img_size": cfg.image_size, **kwargs})
    except TypeError as err:  # CNN trunks take any size and have no img_size argument
        if "img_size" not in str(err):
            raise
        trunk = timm.create_model(cfg.model_name, num_classes=0, **kwargs)
    data_cfg = trunk.pretrained_cfg
    cfg.mean = cfg.mean or tuple(data_cfg.get("mean", OPENAI_MEAN))
    cfg.std = cfg.std or tuple(data_cfg.get("std", OPENAI_STD))
    return TimmEncoder(trunk, cfg.image_size, cfg.mean, cfg.std)
