"""Backbone files: each VGG16 kind with the input scaling it was trained on and SSD's subsampled fc6/fc7;
files read through storage (s3:// too), and not at all when trained weights follow."""

import io

import pytest
import torch
from torchvision.models import mobilenet_v3_large, vgg16

from almdn_ray import storage
from almdn_ray.model import ModelSpec, build_ssdgmm
from almdn_ray.model.backbones import INPUT_NORMS, BackboneWeightsError, vgg16_weights_kind
from almdn_ray.scoring import load_model


@pytest.fixture(scope="module")
def imagenet_v1(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vgg") / "vgg16-imagenet1k_v1.pth"
    torch.save(vgg16(weights=None).state_dict(), path)
    return path


def test_torchvision_imagenet1k_v1_gets_its_standardisation_and_the_papers_subsampled_fc6_fc7(imagenet_v1):
    state = torch.load(imagenet_v1, weights_only=True)
    assert vgg16_weights_kind(state) == "imagenet1k_v1"
    with pytest.raises(BackboneWeightsError, match="set model.input_norm: imagenet"):
        build_ssdgmm("ssd300_vgg16", num_classes=3, backbone_weights=imagenet_v1)  # the preset scales as Caffe
    model = build_ssdgmm("ssd300_vgg16", num_classes=3, backbone_weights=imagenet_v1, input_norm="imagenet")
    mean, std = INPUT_NORMS["imagenet"]
    torch.testing.assert_close(model.image_std.flatten(), torch.tensor(std))
    torch.testing.assert_close(model.image_mean.flatten(), torch.tensor(mean))
    conv6, conv7 = model.backbone.extra[0][7][1], model.backbone.extra[0][7][3]
    fc6 = state["classifier.0.weight"].view(4096, 512, 7, 7)
    torch.testing.assert_close(conv6.weight, fc6[::4, :, ::3, ::3])  # [1024, 512, 3, 3], dilated by 6
    torch.testing.assert_close(conv6.bias, state["classifier.0.bias"][::4])
    torch.testing.assert_close(conv7.weight[:, :, 0, 0], state["classifier.3.weight"][::4, ::4])
    torch.testing.assert_close(model.backbone.extra[0][1].weight, state["features.24.weight"])  # conv5_1
    torch.testing.assert_close(model.backbone.features[0].weight, state["features.0.weight"])


def test_torchvision_features_weights_are_caffe_scaled_and_keep_fresh_fc_layers(imagenet_v1, tmp_path):
    state = torch.load(imagenet_v1, weights_only=True)
    for key in ("classifier.0.weight", "classifier.3.weight", "classifier.6.weight"):
        state[key] = torch.full_like(state[key], float("nan"))  # as torchvision ships IMAGENET1K_FEATURES
    path = tmp_path / "vgg16_features.pth"
    torch.save(state, path)
    assert vgg16_weights_kind(state) == "imagenet1k_features"
    with pytest.raises(BackboneWeightsError, match="set model.input_norm: caffe"):
        build_ssdgmm("ssd300_vgg16", num_classes=3, backbone_weights=path, input_norm="imagenet")
    model = build_ssdgmm("ssd300_vgg16", num_classes=3, backbone_weights=path)
    assert torch.isfinite(model.backbone.extra[0][7][1].weight).all()
    torch.testing.assert_close(model.image_std.flatten(), torch.tensor(INPUT_NORMS["caffe"][1]))
    torch.testing.assert_close(model.backbone.features[2].weight, state["features.2.weight"])


def test_backbone_weights_from_s3_and_never_read_when_trained_weights_follow(s3_bucket, tmp_path):
    reference = mobilenet_v3_large(weights=None)
    buffer = io.BytesIO()
    torch.save(reference.state_dict(), buffer)
    uri = f"{s3_bucket}/weights/mobilenet_v3_large.pth"
    storage.write_bytes(uri, buffer.getvalue())
    spec = ModelSpec(num_classes=3, image_size=96, backbone_weights=uri)
    model = spec.build(backbone=uri)
    torch.testing.assert_close(model.backbone.features[0][0][0].weight, reference.features[0][0].weight)
    # A node without the file: the trained model loads, the ImageNet file is not touched.
    weights = tmp_path / "model.pt"
    torch.save(model.state_dict(), weights)
    missing = ModelSpec(num_classes=3, image_size=96, backbone_weights=str(tmp_path / "not-on-this-node.pth"))
    loaded = load_model(missing, str(weights))
    torch.testing.assert_close(loaded.backbone.features[0][0][0].weight, reference.features[0][0].weight)
    with pytest.raises(FileNotFoundError, match="model.backbone_weights"):
        missing.build(backbone=missing.backbone_weights)
