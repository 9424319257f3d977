"""SSD-GMM: an SSD whose head predicts mixtures, and its presets (one builder holds them all)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSDHead
from torchvision.models.detection.ssdlite import SSDLiteHead

from almdn_ray.model.anchors import check_scales, ssd300_default_boxes, ssdlite_default_boxes
from almdn_ray.model.backbones import INPUT_NORMS, mobilenet_v3_extractor, vgg16_extractor
from almdn_ray.model.gmm_head import MixtureHead, MixtureOutputs

__all__ = ["Preset", "PRESETS", "ModelSpec", "SSDGMM", "PlainSSD", "build_ssdgmm", "build_plain_ssd"]


@dataclass(frozen=True)
class Preset:
    """What differs between the model presets."""

    backbone: str  # "vgg16" | "mobilenet_v3"
    image_size: int
    input_norm: str  # default input scaling, a key of backbones.INPUT_NORMS
    separable_head: bool


PRESETS = {
    # The paper's model. Input as torchvision's SSD300 and ssd.pytorch (0-255, ImageNet mean subtracted).
    "ssd300_vgg16": Preset("vgg16", 300, "caffe", False),
    # Small and fast, for CPU: SSDLite with MobileNetV3-Large.
    "ssdlite320_mobilenet_v3": Preset("mobilenet_v3", 320, "half", True),
}


class _SSDBase(nn.Module):
    """Normalisation, backbone and default boxes shared by the mixture and plain detectors."""

    def __init__(
        self,
        *,
        backbone: nn.Module,
        anchor_generator: nn.Module,
        image_size: int,
        image_mean: tuple[float, ...],
        image_std: tuple[float, ...],
    ):
        super().__init__()
        self.backbone = backbone
        self.anchor_generator = anchor_generator
        self.image_size = image_size
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)

    def features(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        """Args: images ``[B, 3, H, W]`` in [0, 1]. Returns: feature maps and anchors ``[A, 4]``."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        x = (images - self.image_mean) / self.image_std
        features = list(self.backbone(x).values())
        height, width = images.shape[-2:]
        anchors = self.anchor_generator(ImageList(images[:1], [(height, width)]), features)[0]
        return features, anchors


class SSDGMM(_SSDBase):
    """SSD with a :class:`MixtureHead`; ``forward`` returns raw :class:`MixtureOutputs` in every mode.

    Loss and detections are separate functions (``MultiboxMixtureLoss``, ``postprocess``).
    """

    def __init__(self, *, head: MixtureHead, **base):
        super().__init__(**base)
        self.head = head
        self.num_classes = head.num_classes
        self.num_components = head.num_components

    def forward(self, images: Tensor) -> MixtureOutputs:
        features, anchors = self.features(images)
        return self.head(features, anchors)

    def forward_with_features(self, images: Tensor) -> tuple[MixtureOutputs, list[Tensor]]:
        """The raw outputs and the backbone's feature maps they came from (for embeddings, no second pass)."""
        features, anchors = self.features(images)
        return self.head(features, anchors), features


class PlainSSD(_SSDBase):
    """The same backbone with torchvision's point-estimate SSD head, for side-by-side comparisons."""

    def __init__(self, *, head: nn.Module, **base):
        super().__init__(**base)
        self.head = head

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Returns ``{"bbox_regression": [B, A, 4], "cls_logits": [B, A, C], "anchors": [A, 4]}``."""
        features, anchors = self.features(images)
        return {**self.head(features), "anchors": anchors}


def _parts(
    preset: str,
    *,
    anchor_set: str,
    backbone_weights,
    image_size,
    width_mult: float,
    input_norm=None,
    pretrained=None,
    anchor_scales=None,
    small_objects: bool = False,
):
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    spec = PRESETS[preset]
    size = image_size or spec.image_size
    norm = input_norm or spec.input_norm
    if norm not in INPUT_NORMS:
        raise ValueError(f"model.input_norm: unknown {norm!r}; choose one of {sorted(INPUT_NORMS)}")
    if spec.backbone == "vgg16":
        if size != 300:
            raise ValueError(f"ssd300_vgg16 takes 300x300 inputs (its default boxes assume it), got image_size={size}")
        if small_objects:
            raise ValueError("model.small_objects is for the small preset; ssd300_vgg16 already has a stride-8 level")
        backbone = vgg16_extractor(weights=backbone_weights, input_norm=norm)
        anchor_generator = ssd300_default_boxes(anchor_set, anchor_scales)
    else:
        full = backbone_weights is not None if pretrained is None else pretrained
        backbone = mobilenet_v3_extractor(
            weights=backbone_weights, width_mult=width_mult, reduced_tail=not full, small_objects=small_objects
        )
        anchor_generator = ssdlite_default_boxes(7 if small_objects else 6, anchor_scales)
    with torch.no_grad():
        was_training = backbone.training
        backbone.eval()
        maps = list(backbone(torch.zeros(1, 3, size, size)).values())
        backbone.train(was_training)
    in_channels = [m.shape[1] for m in maps]
    base = dict(
        backbone=backbone,
        anchor_generator=anchor_generator,
        image_size=size,
        image_mean=INPUT_NORMS[norm][0],
        image_std=INPUT_NORMS[norm][1],
    )
    return spec, base, in_channels, anchor_generator.num_anchors_per_location()


def build_ssdgmm(
    preset: str = "ssd300_vgg16",
    *,
    num_classes: int,
    num_components: int = 4,
    anchor_set: str = "voc",
    backbone_weights: str | Path | dict | None = None,
    image_size: int | None = None,
    width_mult: float = 1.0,
    dropout: float = 0.0,
    input_norm: str | None = None,
    pretrained: bool | None = None,
    anchor_scales: list[float] | None = None,
    small_objects: bool = False,
) -> SSDGMM:
    """Build an SSD-GMM from a preset.

    Args:
        preset: ``"ssd300_vgg16"`` (the paper) or ``"ssdlite320_mobilenet_v3"`` (small, for CPU).
        num_classes: C, background included (21 for VOC).
        num_components: K mixture components (4 in the paper).
        anchor_set: ``"voc"`` or ``"coco"`` default-box scales (ssd300_vgg16 only).
        backbone_weights: an ImageNet ``state_dict`` for the backbone, or its file (path, ``file://``, ``s3://``);
            None trains from scratch.
        image_size: input side in pixels (only the small preset can change it; <= 320).
        width_mult: backbone channel multiplier (small preset only).
        dropout: dropout on the head's input feature maps (for MC-dropout scoring; 0 = none).
        input_norm: input scaling (``caffe``, ``imagenet``, ``half``); None: the preset's.
        pretrained: the architecture of a backbone made for ImageNet weights (the small preset's full tail)
            even when ``backbone_weights`` is not loaded now; None: whether it is given.
        anchor_scales: default-box sides per feature level relative to the input (levels + 1 values); None:
            the preset's (``anchor_set`` for SSD300; 0.2 … 0.95 for the small preset, 0.1 first with
            ``small_objects``).
        small_objects: the small preset also predicts from its stride-8 feature map (7 levels), whose default
            boxes cover objects below a fifth of the input.
    """
    spec, base, in_channels, num_anchors = _parts(
        preset,
        anchor_set=anchor_set,
        backbone_weights=backbone_weights,
        image_size=image_size,
        width_mult=width_mult,
        input_norm=input_norm,
        pretrained=pretrained,
        anchor_scales=anchor_scales,
        small_objects=small_objects,
    )
    head = MixtureHead(
        in_channels=in_channels,
        num_anchors=num_anchors,
        num_classes=num_classes,
        num_components=num_components,
        separable=spec.separable_head,
        dropout=dropout,
    )
    return SSDGMM(head=head, **base)


def build_plain_ssd(
    preset: str = "ssd300_vgg16",
    *,
    num_classes: int,
    anchor_set: str = "voc",
    backbone_weights: str | Path | None = None,
    image_size: int | None = None,
    width_mult: float = 1.0,
    anchor_scales: list[float] | None = None,
    small_objects: bool = False,
) -> PlainSSD:
    """The same preset with torchvision's plain SSD (or SSDLite) head."""
    spec, base, in_channels, num_anchors = _parts(
        preset,
        anchor_set=anchor_set,
        backbone_weights=backbone_weights,
        image_size=image_size,
        width_mult=width_mult,
        anchor_scales=anchor_scales,
        small_objects=small_objects,
    )
    if spec.separable_head:
        from functools import partial

        head = SSDLiteHead(in_channels, num_anchors, num_classes, partial(nn.BatchNorm2d, eps=0.001, momentum=0.03))
    else:
        head = SSDHead(in_channels, num_anchors, num_classes)
    return PlainSSD(head=head, **base)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build the same model in another process (a plain dict at the Ray boundary)."""

    preset: str = "ssdlite320_mobilenet_v3"
    num_classes: int | None = None  # C with background; None until the dataset is known
    num_components: int = 4
    anchor_set: str = "voc"
    image_size: int | None = None
    backbone_weights: str | None = None
    width_mult: float = 1.0
    dropout: float = 0.0  # on the head's inputs; > 0 for the mc_dropout strategy
    input_norm: str | None = None  # caffe | imagenet | half; None: the preset's (caffe for VGG16, half for SSDLite)
    anchor_scales: list[float] | None = None  # default-box side per level / input side (levels + 1); None: preset's
    small_objects: bool = False  # small preset: add the stride-8 level (7 levels) for objects < 0.2 of the input

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"model.preset: unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"model.num_classes must count background and >= 1 class, got {self.num_classes}")
        if self.num_components < 1:
            raise ValueError(f"model.num_components must be >= 1, got {self.num_components}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.input_norm is not None and self.input_norm not in INPUT_NORMS:
            raise ValueError(f"model.input_norm: unknown {self.input_norm!r}; choose one of {sorted(INPUT_NORMS)}")
        if self.small_objects and PRESETS[self.preset].backbone != "mobilenet_v3":
            raise ValueError("model.small_objects is for the small preset; ssd300_vgg16 already has a stride-8 level")
        if self.anchor_scales is not None:
            object.__setattr__(self, "anchor_scales", [float(s) for s in self.anchor_scales])
            check_scales(self.anchor_scales, 7 if self.small_objects else 6)

    @property
    def input_size(self) -> int:
        return self.image_size or PRESETS[self.preset].image_size

    def build(self, *, backbone: dict | str | None = None) -> SSDGMM:
        """The model, its backbone from ``backbone`` (a state_dict or file) when given, else freshly initialised.

        ``backbone_weights`` is not read here: a model that loads trained weights next needs no ImageNet
        file, and training reads it once (:func:`almdn_ray.model.backbones.load_state_dict_file`) and hands
        the tensors to every worker.
        """
        if self.num_classes is None:
            raise ValueError("model.num_classes is not set; it comes from the dataset (background included)")
        return build_ssdgmm(
            self.preset,
            num_classes=self.num_classes,
            num_components=self.num_components,
            anchor_set=self.anchor_set,
            backbone_weights=backbone,
            input_norm=self.input_norm,
            pretrained=self.backbone_weights is not None,
            image_size=self.image_size,
            width_mult=self.width_mult,
            dropout=self.dropout,
            anchor_scales=self.anchor_scales,
            small_objects=self.small_objects,
        )
