import pytest
import torch
from torchvision.models import mobilenet_v3_large

from almdn_ray.model import build_plain_ssd, build_ssdgmm
from almdn_ray.model.anchors import SSD300_SCALES
from almdn_ray.model.backbones import BackboneWeightsError


@pytest.mark.parametrize("num_components", [1, 2, 4])
@pytest.mark.parametrize(
    ("preset", "size", "num_anchors"), [("ssd300_vgg16", 300, 8732), ("ssdlite320_mobilenet_v3", 320, 3234)]
)
def test_output_shapes(preset, size, num_anchors, num_components):
    model = build_ssdgmm(preset, num_classes=5, num_components=num_components).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, size, size))
    k = num_components
    assert out.loc_mu.shape == out.loc_sigma_logit.shape == out.loc_pi_logit.shape == (2, num_anchors, k, 4)
    assert out.cls_logits.shape == out.cls_sigma_logit.shape == (2, num_anchors, k, 5)
    assert out.cls_pi_logit.shape == (2, num_anchors, k)
    assert out.anchors.shape == (num_anchors, 4)


def test_voc_and_coco_default_boxes_differ_in_scale():
    images = torch.rand(1, 3, 300, 300)
    with torch.no_grad():
        voc = build_ssdgmm(num_classes=21, anchor_set="voc").eval()(images).anchors
        coco = build_ssdgmm(num_classes=81, anchor_set="coco").eval()(images).anchors
    # The first default box of conv4_3 is square with side scale·300 px.
    assert (voc[0, 2] - voc[0, 0]).item() == pytest.approx(SSD300_SCALES["voc"][0] * 300, rel=1e-5)
    assert (coco[0, 2] - coco[0, 0]).item() == pytest.approx(SSD300_SCALES["coco"][0] * 300, rel=1e-5)


def test_small_preset_accepts_smaller_inputs():
    model = build_ssdgmm("ssdlite320_mobilenet_v3", num_classes=3, image_size=160).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 160, 160))
    assert out.anchors.shape[0] == out.loc_mu.shape[1] == 840
    assert out.anchors.max() <= 160 * 1.5  # boxes are in input pixels


def test_plain_head_on_the_same_backbone():
    model = build_plain_ssd("ssdlite320_mobilenet_v3", num_classes=4, image_size=192).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 192, 192))
    assert out["bbox_regression"].shape == (2, 1170, 4)
    assert out["cls_logits"].shape == (2, 1170, 4)


def test_bad_preset_arguments_are_named():
    with pytest.raises(ValueError, match="unknown model preset 'ssd999'"):
        build_ssdgmm("ssd999", num_classes=3)
    with pytest.raises(ValueError, match="300x300"):
        build_ssdgmm("ssd300_vgg16", num_classes=3, image_size=512)
    with pytest.raises(ValueError, match="anchor_set"):
        build_ssdgmm("ssd300_vgg16", num_classes=3, anchor_set="kitti")
    with pytest.raises(ValueError, match="num_components"):
        build_ssdgmm("ssdlite320_mobilenet_v3", num_classes=3, num_components=0)


def test_backbone_weights_load_from_a_file(tmp_path):
    reference = mobilenet_v3_large(weights=None)
    path = tmp_path / "mobilenet_v3_large.pth"
    torch.save(reference.state_dict(), path)
    model = build_ssdgmm("ssdlite320_mobilenet_v3", num_classes=3, backbone_weights=path)
    first_conv = model.backbone.features[0][0][0].weight
    torch.testing.assert_close(first_conv, reference.features[0][0].weight)


def test_wrong_backbone_file_names_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "not_a_mobilenet.pth"
    torch.save({"conv.weight": torch.zeros(3), "features.0.0.weight": torch.zeros(1)}, path)
    with pytest.raises(BackboneWeightsError, match=r"missing keys .*unexpected keys \['conv.weight'\]") as error:
        build_ssdgmm("ssdlite320_mobilenet_v3", num_classes=3, backbone_weights=path)
    assert "not_a_mobilenet.pth" in str(error.value)
    assert "wrong shapes ['features.0.0.weight']" in str(error.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_ssdgmm("ssdlite320_mobilenet_v3", num_classes=3, backbone_weights=tmp_path / "missing.pth")


def test_reduced_fc_vgg_file_maps_onto_the_extractor(tmp_path):
    # ssd.pytorch's vgg16_reducedfc layout: VGG conv layers by index, then fc6 (31) and fc7 (33) as convs.
    reference = build_ssdgmm("ssd300_vgg16", num_classes=3).backbone
    state = {k.removeprefix("features."): v for k, v in reference.state_dict().items() if k.startswith("features.")}
    for index, name in {
        "24": "extra.0.1",
        "26": "extra.0.3",
        "28": "extra.0.5",
        "31": "extra.0.7.1",
        "33": "extra.0.7.3",
    }.items():
        for param in ("weight", "bias"):
            state[f"{index}.{param}"] = torch.randn_like(reference.state_dict()[f"{name}.{param}"])
    path = tmp_path / "vgg16_reducedfc.pth"
    torch.save(state, path)
    backbone = build_ssdgmm("ssd300_vgg16", num_classes=3, backbone_weights=path).backbone
    torch.testing.assert_close(backbone.extra[0][7][1].weight, state["31.weight"])
    torch.testing.assert_close(backbone.features[0].weight, state["0.weight"])
    del state["33.bias"]
    torch.save(state, path)
    with pytest.raises(BackboneWeightsError, match=r"missing keys \['extra.0.7.3.bias'\]"):
        build_ssdgmm("ssd300_vgg16", num_classes=3, backbone_weights=path)


def test_small_object_setting_adds_the_stride_8_level_with_its_small_boxes(tmp_path):
    plain = build_ssdgmm("ssdlite320_mobilenet_v3", num_classes=3, image_size=128).eval()
    small = build_ssdgmm("ssdlite320_mobilenet_v3", num_classes=3, image_size=128, small_objects=True).eval()
    images = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        maps = list(small.backbone(images).values())
        out = small(images)
        plain_maps = list(plain.backbone(images).values())
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 2, 1, 1, 1]  # stride 8 first, then SSDLite's six
    assert [m.shape[-1] for m in plain_maps] == [8, 4, 2, 1, 1, 1]
    assert out.anchors.shape[0] == 16 * 16 * 6 + 522
    first = out.anchors[0]
    assert (first[2] - first[0]).item() == pytest.approx(0.1 * 128, rel=1e-4)  # the stride-8 level's square box
    # Same parameters and keys as the plain extractor: ImageNet weights load the same way.
    assert small.backbone.state_dict().keys() == plain.backbone.state_dict().keys()
    reference = mobilenet_v3_large(weights=None)
    path = tmp_path / "mobilenet_v3_large.pth"
    torch.save(reference.state_dict(), path)
    loaded = build_ssdgmm("ssdlite320_mobilenet_v3", num_classes=3, backbone_weights=path, small_objects=True)
    torch.testing.assert_close(loaded.backbone.features[0][0][0].weight, reference.features[0][0].weight)


def test_anchor_scales_are_configurable_and_checked():
    from almdn_ray.model import ModelSpec

    scales = [0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9]
    model = ModelSpec(num_classes=3, image_size=128, anchor_scales=scales).build().eval()
    with torch.no_grad():
        anchors = model(torch.rand(1, 3, 128, 128)).anchors
    assert (anchors[0, 2] - anchors[0, 0]).item() == pytest.approx(0.05 * 128, rel=1e-4)
    vgg = build_ssdgmm("ssd300_vgg16", num_classes=3, anchor_scales=[0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0]).eval()
    with torch.no_grad():
        first = vgg(torch.rand(1, 3, 300, 300)).anchors[0]
    assert (first[2] - first[0]).item() == pytest.approx(0.05 * 300, rel=1e-4)
    with pytest.raises(ValueError, match="6 feature levels, so give 7"):
        ModelSpec(num_classes=3, anchor_scales=[0.1, 0.2])
    with pytest.raises(ValueError, match="7 feature levels, so give 8"):
        ModelSpec(num_classes=3, small_objects=True, anchor_scales=scales)
    with pytest.raises(ValueError, match="increase"):
        ModelSpec(num_classes=3, anchor_scales=list(reversed(scales)))
    with pytest.raises(ValueError, match="small preset"):
        ModelSpec(preset="ssd300_vgg16", num_classes=3, small_objects=True)
