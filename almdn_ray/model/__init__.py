"""SSD-GMM: SSD with mixture-density heads, built from torchvision's detection parts. No Ray here."""

from almdn_ray.model.detector import PRESETS, SSDGMM, ModelSpec, PlainSSD, build_plain_ssd, build_ssdgmm
from almdn_ray.model.gmm_head import MixtureHead, MixtureOutputs
from almdn_ray.model.loss import LossConfig, LossTerms, MultiboxMixtureLoss
from almdn_ray.model.postprocess import Detections, PostprocessConfig, postprocess

__all__ = [
    "PRESETS",
    "ModelSpec",
    "PlainSSD",
    "SSDGMM",
    "build_plain_ssd",
    "build_ssdgmm",
    "MixtureHead",
    "MixtureOutputs",
    "LossConfig",
    "LossTerms",
    "MultiboxMixtureLoss",
    "Detections",
    "PostprocessConfig",
    "postprocess",
]
