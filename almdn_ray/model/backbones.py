"""SSD feature extractors built from torchvision's detection parts, with weights from a file path.

Nothing is downloaded: every builder calls torchvision with ``weights=None``; ImageNet weights, when the
user has them, load from a local file with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torchvision.models import mobilenet_v3_large, vgg16
from torchvision.models.detection.ssd import _vgg_extractor
from torchvision.models.detection.ssdlite import _mobilenet_extractor

logger = logging.getLogger(__name__)

__all__ = ["BackboneWeightsError", "load_state_dict_file", "vgg16_extractor", "mobilenet_v3_extractor"]

# ssd.pytorch's "vgg16_reducedfc" layout numbers the VGG layers without a prefix; these are where its
# conv5 and fc6/fc7 layers live inside torchvision's SSDFeatureExtractorVGG.
_REDUCED_FC_TO_EXTRACTOR = {
    "24": "extra.0.1",
    "26": "extra.0.3",
    "28": "extra.0.5",
    "31": "extra.0.7.1",
    "33": "extra.0.7.3",
}


class BackboneWeightsError(ValueError):
    """A backbone weight file does not fit the backbone."""


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a plain ``state_dict`` file (no pickled objects)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file {path} does not exist; give the path of a saved state_dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a bad file
        raise BackboneWeightsError(
            f"{path} is not a loadable state_dict ({error}); save weights with torch.save(model.state_dict(), path)"
        ) from error
    if not isinstance(state, dict):
        raise BackboneWeightsError(f"{path} holds a {type(state).__name__}, not a state_dict of tensors")
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


def _load_checked(module: nn.Module, state: dict[str, torch.Tensor], path, *, what: str) -> None:
    """Load everything but the ImageNet classifier, which SSD does not use."""
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    expected = {k: v for k, v in module.state_dict().items() if not k.startswith("classifier.")}
    _check_keys(expected, state, path, what)
    module.load_state_dict(state, strict=False)


def vgg16_extractor(*, weights_path: str | Path | None = None, trainable_layers: int = 5) -> nn.Module:
    """The SSD300 VGG16 feature extractor (conv4_3 … conv11_2, six feature maps).

    Args:
        weights_path: a torchvision ``vgg16`` ImageNet ``state_dict`` (``features.*`` keys; ``classifier.*``
            is ignored) or ssd.pytorch's reduced-fc VGG16 (keys ``0.weight`` … ``33.bias``).
        trainable_layers: VGG stages left trainable, counted from the last (5 = all).
    """
    classifier = vgg16(weights=None)
    state = load_state_dict_file(weights_path) if weights_path is not None else None
    reduced_fc = state is not None and "0.weight" in state
    if state is not None and not reduced_fc:
        _load_checked(classifier, state, weights_path, what="VGG16")
    extractor = _vgg_extractor(classifier, False, trainable_layers)
    if reduced_fc:
        mapped = {}
        for key, value in state.items():
            index, _, name = key.partition(".")
            mapped[f"{_REDUCED_FC_TO_EXTRACTOR.get(index, f'features.{index}')}.{name}"] = value
        expected = {k: v for k, v in extractor.state_dict().items() if k.startswith(("features.", "extra.0."))}
        _check_keys(expected, mapped, weights_path, "VGG16 reduced-fc")
        extractor.load_state_dict(mapped, strict=False)
    if state is not None:
        logger.info("loaded VGG16 backbone weights from %s", weights_path)
    return extractor


def mobilenet_v3_extractor(
    *, weights_path: str | Path | None = None, trainable_layers: int = 6, width_mult: float = 1.0
) -> nn.Module:
    """The SSDLite MobileNetV3-Large feature extractor (six feature maps, 1/16 … 1/320 of the input).

    Args:
        weights_path: a torchvision ``mobilenet_v3_large`` ImageNet ``state_dict`` (``classifier.*`` ignored).
        trainable_layers: stages left trainable, counted from the last (6 = all).
        width_mult: channel multiplier of the backbone (1.0 for ImageNet weights; smaller is faster).
    """
    norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    classifier = mobilenet_v3_large(
        weights=None, norm_layer=norm_layer, reduced_tail=weights_path is None, width_mult=width_mult
    )
    if weights_path is not None:
        _load_checked(classifier, load_state_dict_file(weights_path), weights_path, what="MobileNetV3")
        logger.info("loaded MobileNetV3 backbone weights from %s", weights_path)
    return _mobilenet_extractor(classifier, trainable_layers, norm_layer)
