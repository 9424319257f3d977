import pytest
import torch

from almdn_ray import mdn
from almdn_ray.model import LossConfig, MixtureOutputs, MultiboxMixtureLoss
from almdn_ray.model.anchors import make_box_coder

ANCHORS = torch.tensor(
    [
        [0.0, 0.0, 10.0, 10.0],
        [0.0, 0.0, 12.0, 10.0],
        [20.0, 20.0, 30.0, 30.0],
        [50.0, 50.0, 60.0, 60.0],
        [70.0, 70.0, 80.0, 80.0],
        [0.0, 50.0, 10.0, 60.0],
        [50.0, 0.0, 60.0, 10.0],
        [80.0, 0.0, 90.0, 10.0],
    ]
)  # A = 8


def outputs(batch=1, k=2, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = ANCHORS.shape[0]

    def r(*shape):
        return torch.randn(*shape, generator=g, requires_grad=True)

    return MixtureOutputs(
        r(batch, a, k, 4),
        r(batch, a, k, 4),
        r(batch, a, k, 4),
        r(batch, a, k, c),
        r(batch, a, k, c),
        r(batch, a, k),
        ANCHORS,
    )


def target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels)}


def test_matching_threshold_and_best_anchor_of_every_ground_truth():
    loss = MultiboxMixtureLoss()
    # Box 1 overlaps anchors 0 and 1 (IoU 1.0 and 0.83); box 2 has IoU < 0.5 with everything but still gets
    # its best anchor (3).
    gt = target([[0, 0, 10, 10], [52, 52, 65, 65]], [2, 1])
    from almdn_ray.model.loss import match_anchors

    labels, matched = match_anchors(ANCHORS, gt["boxes"], gt["labels"], loss.matcher)
    assert labels.tolist() == [2, 2, 0, 1, 0, 0, 0, 0]
    assert matched[3].tolist() == [52, 52, 65, 65]


def test_encoding_round_trip_with_variances():
    coder = make_box_coder((0.1, 0.2))
    boxes = torch.tensor([[1.0, 2.0, 11.0, 9.0], [48.0, 51.0, 66.0, 58.0]])
    anchors = ANCHORS[[0, 3]]
    encoded = coder.encode_single(boxes, anchors)
    # centre offset of box 0 / anchor width / 0.1: (6 - 5) / 10 / 0.1 = 1.0
    assert encoded[0, 0].item() == pytest.approx(1.0)
    assert encoded[0, 2].item() == pytest.approx(0.0)  # log(10/10) / 0.2
    torch.testing.assert_close(coder.decode_single(encoded, anchors), boxes)


def test_terms_are_divided_by_the_number_of_positives():
    out = outputs()
    noise = torch.randn(1, 8, 2, 3)
    gt = [target([[0, 0, 10, 10], [50, 50, 60, 60]], [2, 1])]  # positives: anchors 0, 1, 3
    terms = MultiboxMixtureLoss()(out, gt, noise=noise)
    assert terms.num_positives == 3
    coder = make_box_coder()
    positives = torch.tensor([0, 1, 3])
    matched = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]], dtype=torch.float32)
    encoded = coder.encode_single(matched, ANCHORS[positives])
    loc = (
        mdn.localization_nll(
            encoded, out.loc_mu[0, positives], out.loc_sigma_logit[0, positives], out.loc_pi_logit[0, positives]
        ).sum()
        / 3
    )
    torch.testing.assert_close(terms.loc, loc)
    labels = torch.tensor([2, 2, 0, 1, 0, 0, 0, 0])
    per_anchor = mdn.classification_loss(
        out.cls_logits[0], out.cls_sigma_logit[0], out.cls_pi_logit[0], labels, noise[0]
    )
    negatives = per_anchor.detach().masked_fill(labels > 0, -1e9).topk(5).indices  # 3:1 capped by 5 negatives
    expected_cls = (per_anchor[positives].sum() + per_anchor[negatives].sum()) / 3
    torch.testing.assert_close(terms.cls, expected_cls)
    torch.testing.assert_close(terms.total, terms.loc + terms.cls)


def test_hard_negative_mining_takes_three_per_positive_hardest_first():
    loss = MultiboxMixtureLoss(LossConfig(neg_pos_ratio=3))
    cls_loss = torch.tensor([[9.0, 1.0, 5.0, 7.0, 2.0, 8.0, 3.0, 0.5]])
    positive = torch.zeros(1, 8, dtype=torch.bool)
    positive[0, 0] = True
    chosen = loss._hard_negatives(cls_loss, positive)
    assert chosen[0].nonzero().flatten().tolist() == [2, 3, 5]


def test_images_without_boxes_work():
    out = outputs(batch=2)
    terms = MultiboxMixtureLoss()(out, [target([], []), target([[20, 20, 30, 30]], [1])])
    assert terms.num_positives == 1
    terms.total.backward()
    assert torch.isfinite(terms.total)
    # The empty image contributes nothing: no positives, hence no mined negatives.
    assert out.cls_logits.grad[0].abs().sum() == 0
    empty = MultiboxMixtureLoss()(outputs(batch=1), [target([], [])])
    assert empty.num_positives == 0 and empty.total.item() == 0.0


@pytest.mark.parametrize("kind", ["type1", "type2"])
def test_both_classification_losses_train(kind):
    out = outputs()
    terms = MultiboxMixtureLoss(LossConfig(cls_loss=kind))(out, [target([[0, 0, 10, 10]], [1])])
    terms.total.backward()
    assert torch.isfinite(out.cls_logits.grad).all() and out.cls_logits.grad.abs().sum() > 0


def test_bad_targets_and_config_are_named():
    with pytest.raises(ValueError, match=r"target 0: labels must be in 1..2"):
        MultiboxMixtureLoss()(outputs(), [target([[0, 0, 10, 10]], [3])])
    with pytest.raises(ValueError, match="cls_loss"):
        LossConfig(cls_loss="focal")
    with pytest.raises(ValueError, match="2 targets for a batch of 1"):
        MultiboxMixtureLoss()(outputs(), [target([], []), target([], [])])


def test_batched_matching_equals_the_per_image_matcher():
    from torch.nn.utils.rnn import pad_sequence

    from almdn_ray.model.loss import match_anchors, match_anchors_batch

    loss = MultiboxMixtureLoss()
    g = torch.Generator().manual_seed(5)
    anchors = torch.rand(300, 2, generator=g) * 80
    anchors = torch.cat([anchors, anchors + 5 + torch.rand(300, 2, generator=g) * 20], dim=1)
    per_image = []
    for count in (0, 1, 3, 7, 2):  # an empty image, and ground truths that share their best anchor
        corner = torch.rand(count, 2, generator=g) * 60
        boxes = torch.cat([corner, corner + 8 + torch.rand(count, 2, generator=g) * 30], dim=1)
        if count >= 3:
            boxes[2] = boxes[1] + 0.5  # two ground truths with the same best anchor: the later one wins
        per_image.append(target(boxes.tolist(), torch.randint(1, 3, (count,), generator=g).tolist()))
    padded = pad_sequence([t["boxes"] for t in per_image], batch_first=True)
    labels = pad_sequence([t["labels"] for t in per_image], batch_first=True)
    batch_labels, batch_boxes = match_anchors_batch(anchors, padded, labels, 0.5)
    for i, t in enumerate(per_image):
        expected_labels, expected_boxes = match_anchors(anchors, t["boxes"], t["labels"], loss.matcher)
        assert batch_labels[i].tolist() == expected_labels.tolist(), i
        positive = expected_labels > 0
        assert torch.equal(batch_boxes[i][positive], expected_boxes[positive]), i
    assert (batch_labels > 0).sum() > 10
