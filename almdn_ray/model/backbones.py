"""SSD feature extractors built from torchvision's detection parts, with weights read through storage.

Nothing is downloaded: every builder calls torchvision with ``weights=None``; ImageNet weights, when the
user has them, are read once (local path, ``file://`` or ``s3://``) with ``torch.load(..., weights_only=True)``
and mapped onto the extractor (:func:`extractor_weights`). Each VGG16 file gets the input scaling it was
trained with (:data:`INPUT_NORMS`) and, where the file has them, the paper's fc6/fc7 subsampled into the
dilated conv6 and conv7 (SSD, Liu et al. 2016, section 3).
"""

from __future__ import annotations

import io
import logging
from collections import OrderedDict
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torchvision.models import mobilenet_v3_large, vgg16
from torchvision.models.detection.ssd import _vgg_extractor
from torchvision.models.detection.ssdlite import _mobilenet_extractor

from almdn_ray import storage

logger = logging.getLogger(__name__)

__all__ = [
    "BackboneWeightsError", "INPUT_NORMS", "load_state_dict_file", "vgg16_weights_kind", "extractor_weights",
    "vgg16_extractor", "mobilenet_v3_extractor",
]  # fmt: skip

# Input scalings (mean, std) applied to [0, 1] RGB: "caffe" is 0-255 with the ImageNet mean subtracted (the
# Caffe VGG16 that SSD and ssd.pytorch start from; torchvision's IMAGENET1K_FEATURES), "imagenet" is
# torchvision's standardisation (IMAGENET1K_V1 and the MobileNetV3 weights), "half" maps to [-1, 1] (SSDLite).
INPUT_NORMS = {
    "caffe": ((0.48235, 0.45882, 0.40784), (1 / 255, 1 / 255, 1 / 255)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

# ssd.pytorch's "vgg16_reducedfc" layout numbers the VGG layers without a prefix; these are where its
# conv5 and fc6/fc7 layers live inside torchvision's SSDFeatureExtractorVGG.
_REDUCED_FC_TO_EXTRACTOR = {
    "24": "extra.0.1",
    "26": "extra.0.3",
    "28": "extra.0.5",
    "31": "extra.0.7.1",
    "33": "extra.0.7.3",
}
_VGG_CONV5 = {"features.24": "extra.0.1", "features.26": "extra.0.3", "features.28": "extra.0.5"}
# What each kind of VGG16 file was trained on, and whether it has the fc6/fc7 that SSD subsamples.
_VGG16_KINDS = {
    "reduced_fc": ("caffe", "ssd.pytorch vgg16_reducedfc.pth"),
    "imagenet1k_v1": ("imagenet", "torchvision VGG16_Weights.IMAGENET1K_V1"),
    "imagenet1k_features": ("caffe", "torchvision VGG16_Weights.IMAGENET1K_FEATURES"),
    "features_only": (None, "a torchvision VGG16 features state_dict without its classifier"),
}


class BackboneWeightsError(ValueError):
    """A backbone weight file does not fit the backbone."""


def load_state_dict_file(uri: str | Path) -> dict[str, torch.Tensor]:
    """Read a plain ``state_dict`` file (no pickled objects) from a local path, ``file://`` or ``s3://``."""
    try:
        data = storage.read_bytes(str(uri))
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"backbone weights file {uri} does not exist; give the path or s3:// URI of a saved state_dict "
            "(model.backbone_weights)"
        ) from error
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a bad file
        raise BackboneWeightsError(
            f"{uri} is not a loadable state_dict ({error}); save weights with torch.save(model.state_dict(), path)"
        ) from error
    if not isinstance(state, dict):
        raise BackboneWeightsError(f"{uri} holds a {type(state).__name__}, not a state_dict of tensors")
    return state


def _check_keys(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path, what: str) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        raise BackboneWeightsError(
            f"{path} does not fit the {what} backbone: {len(missing)} missing keys {missing[:8]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]}, wrong shapes {wrong_shape[:8]}; "
            "give the ImageNet state_dict of the same torchvision architecture"
        )


def vgg16_weights_kind(state: dict[str, torch.Tensor]) -> str:
    """``reduced_fc`` (ssd.pytorch), ``imagenet1k_v1`` / ``imagenet1k_features`` (torchvision; told apart by the
    classifier, which IMAGENET1K_FEATURES ships as NaN) or ``features_only`` (a torchvision layout without it)."""
    if "0.weight" in state:
        return "reduced_fc"
    fc6 = state.get("classifier.0.weight")
    if fc6 is None:
        return "features_only"
    return "imagenet1k_v1" if bool(torch.isfinite(fc6).all()) else "imagenet1k_features"


def _subsampled_fc(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SSD's conv6/conv7 from VGG16's fc6/fc7: every 4th output (and fc7 input) channel, fc6's 7x7 kernel
    every 3rd tap (a 3x3 kernel that the extractor dilates by 6)."""
    fc6, fc7 = state["classifier.0.weight"], state["classifier.3.weight"]
    if fc6.shape != (4096, 512 * 7 * 7) or fc7.shape != (4096, 4096):
        raise BackboneWeightsError(f"VGG16 fc6/fc7 have shapes {tuple(fc6.shape)}/{tuple(fc7.shape)}, not VGG16's")
    return {
        "extra.0.7.1.weight": fc6.view(4096, 512, 7, 7)[::4, :, ::3, ::3].contiguous(),  # [1024, 512, 3, 3]
        "extra.0.7.1.bias": state["classifier.0.bias"][::4].contiguous(),
        "extra.0.7.3.weight": fc7[::4, ::4].reshape(1024, 1024, 1, 1).contiguous(),
        "extra.0.7.3.bias": state["classifier.3.bias"][::4].contiguous(),
    }


def _vgg16_mapped(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    if kind == "reduced_fc":
        mapped = {}
        for key, value in state.items():
            index, _, name = key.partition(".")
            mapped[f"{_REDUCED_FC_TO_EXTRACTOR.get(index, f'features.{index}')}.{name}"] = value
        return mapped
    mapped = {}
    for key, value in state.items():
        if key.startswith("classifier."):
            continue
        layer, _, name = key.rpartition(".")
        mapped[f"{_VGG_CONV5.get(layer, layer)}.{name}"] = value
    if kind == "imagenet1k_v1":
        mapped.update(_subsampled_fc(state))
    return mapped


def extractor_weights(state: dict[str, torch.Tensor], *, source: str, input_norm: str) -> dict[str, torch.Tensor]:
    """Map a VGG16 file's ``state_dict`` onto the SSD300 feature extractor's keys.

    Args:
        state: the file's tensors, as :func:`load_state_dict_file` read them.
        source: the file's name, for messages.
        input_norm: the model's input scaling (a key of :data:`INPUT_NORMS`); a VGG16 file trained on another
            scaling is refused naming the one to set.

    Raises:
        BackboneWeightsError: the file does not fit, or was trained on another input scaling.
    """
    kind = vgg16_weights_kind(state)
    wanted, what = _VGG16_KINDS[kind]
    if wanted is None:
        logger.warning("%s: %s; trusting model.input_norm %r", source, what, input_norm)
    elif wanted != input_norm:
        raise BackboneWeightsError(
            f"{source} is {what}, trained on {wanted!r}-scaled input, but the model scales its input as "
            f"{input_norm!r}; set model.input_norm: {wanted}"
        )
    if kind in ("imagenet1k_features", "features_only"):
        logger.warning("%s has no usable fc6/fc7: SSD's conv6/conv7 start from random weights", source)
    return _vgg16_mapped(state, kind)


def _load_extractor_weights(extractor: nn.Module, mapped: dict[str, torch.Tensor], *, source: str, what: str) -> None:
    """Load mapped VGG16 weights; every key of the pretrained part must be there with its shape: conv1-conv5
    (``features.*``, ``extra.0.1-5``) and conv6/conv7 (``extra.0.7.*``) when the file has them. SSD's further
    extra layers always start fresh."""
    has_fc = any(k.startswith("extra.0.7.") for k in mapped)
    expected = {
        k: v
        for k, v in extractor.state_dict().items()
        if k.startswith("features.") or (k.startswith("extra.0.") and (has_fc or not k.startswith("extra.0.7.")))
    }
    _check_keys(expected, mapped, source, what)
    extractor.load_state_dict(mapped, strict=False)


def vgg16_extractor(
    *, weights: str | Path | dict | None = None, input_norm: str = "caffe", trainable_layers: int = 5
) -> nn.Module:
    """The SSD300 VGG16 feature extractor (conv4_3 … conv11_2, six feature maps).

    Args:
        weights: a file (path or URI) or its ``state_dict``: torchvision's ``vgg16`` ImageNet weights
            (IMAGENET1K_V1: fc6/fc7 subsampled into conv6/conv7; IMAGENET1K_FEATURES) or ssd.pytorch's
            reduced-fc VGG16 (keys ``0.weight`` … ``33.bias``).
        input_norm: the model's input scaling, checked against what the file was trained on.
        trainable_layers: VGG stages left trainable, counted from the last (5 = all).
    """
    extractor = _vgg_extractor(vgg16(weights=None), False, trainable_layers)
    if weights is not None:
        state, source = (weights, "the weights") if isinstance(weights, dict) else _read(weights)
        what = "VGG16 reduced-fc" if vgg16_weights_kind(state) == "reduced_fc" else "VGG16"
        mapped = extractor_weights(state, source=source, input_norm=input_norm)
        _load_extractor_weights(extractor, mapped, source=source, what=what)
        logger.info("loaded VGG16 backbone weights from %s", source)
    return extractor


def _read(uri) -> tuple[dict, str]:
    return load_state_dict_file(uri), str(uri)


def mobilenet_v3_extractor(
    *,
    weights: str | Path | dict | None = None,
    trainable_layers: int = 6,
    width_mult: float = 1.0,
    reduced_tail: bool | None = None,
    small_objects: bool = False,
) -> nn.Module:
    """The SSDLite MobileNetV3-Large feature extractor (six feature maps, 1/16 … 1/512 of the input).

    Args:
        weights: a torchvision ``mobilenet_v3_large`` ImageNet ``state_dict`` or its file (``classifier.*``
            ignored).
        trainable_layers: stages left trainable, counted from the last (6 = all).
        width_mult: channel multiplier of the backbone (1.0 for ImageNet weights; smaller is faster).
        reduced_tail: halve the last stage's channels (SSDLite from scratch); ImageNet weights need the full
            tail. Default: reduced without ``weights``. A model that is trained from ImageNet weights and later
            rebuilt to load its trained state must pass False then too.
        small_objects: also output the stride-8 map (the C3 stage) as a first level, for objects smaller
            than SSDLite's smallest default box (0.2 of the input at stride 16). Same parameters and keys.
    """
    norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    reduced_tail = weights is None if reduced_tail is None else reduced_tail
    classifier = mobilenet_v3_large(
        weights=None, norm_layer=norm_layer, reduced_tail=reduced_tail, width_mult=width_mult
    )
    if weights is not None:
        state, source = (weights, "the weights") if isinstance(weights, dict) else _read(weights)
        # The extractor regroups the classifier's feature stages: load into the classifier first.
        expected = {k: v for k, v in classifier.state_dict().items() if not k.startswith("classifier.")}
        plain = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        _check_keys(expected, plain, source, "MobileNetV3")
        classifier.load_state_dict(plain, strict=False)
        logger.info("loaded MobileNetV3 backbone weights from %s", source)
    extractor = _mobilenet_extractor(classifier, trainable_layers, norm_layer)
    if not small_objects:
        return extractor
    stride8_end = [i for i, block in enumerate(classifier.features) if getattr(block, "_is_cn", False)][-2]
    return WithStride8(extractor, stride8_end)


class WithStride8(nn.Module):
    """An SSDLite MobileNet extractor that also returns the stride-8 feature map, first.

    The stride-16 stage of torchvision's extractor (``features[0]``) starts with the backbone blocks up to the
    stride-16 one; its prefix ``features[0][:split]`` ends at stride 8. Parameters and state_dict keys are the
    wrapped extractor's, so ImageNet weights load as before.
    """

    def __init__(self, extractor: nn.Module, split: int):
        super().__init__()
        self.features = extractor.features
        self.extra = extractor.extra
        self.split = split

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        first = self.features[0]
        output = [first[: self.split](x)]
        output.append(first[self.split :](output[-1]))
        output.append(self.features[1](output[-1]))
        for block in self.extra:
            output.append(block(output[-1]))
        return OrderedDict((str(i), v) for i, v in enumerate(output))
