import logging

import pytest
import torch
from torch.utils.data import Dataset

from almdn_ray.model import ModelSpec
from almdn_ray.training import LocalContext, TrainingDiverged, TrainRecipe, learning_rate, train_worker
from tests.test_engine import make_images

SPEC = ModelSpec(preset="ssdlite320_mobilenet_v3", num_classes=3, image_size=160)


class Scenes(Dataset):
    """The engine test's images; fetches listed in ``poison`` return an image full of NaN."""

    def __init__(self, poison=lambda fetch: False):
        self.images, self.targets = make_images(4, seed=1)
        self.poison, self.fetches = poison, 0

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        self.fetches += 1
        image = self.images[index]
        return (image * float("nan") if self.poison(self.fetches) else image), self.targets[index]


def recipe(**overrides):
    base = dict(
        max_iterations=9,
        batch_size=2,
        lr=0.01,
        warmup_iterations=1,
        lr_steps=(),
        checkpoint_every=3,
        augment=False,
        precise_bn_batches=0,
        max_restarts=1,
    )
    return TrainRecipe(**{**base, **overrides})


def test_learning_rate_schedule_is_the_papers():
    r = TrainRecipe(lr=1e-3, warmup_iterations=1000, lr_steps=(80_000, 100_000))
    assert learning_rate(r, 0) == pytest.approx(1e-3 * (1 / 1000) ** 4)
    assert learning_rate(r, 499) == pytest.approx(1e-3 * 0.5**4)
    assert learning_rate(r, 999) == pytest.approx(1e-3)
    assert learning_rate(r, 80_000) == pytest.approx(1e-4)
    assert learning_rate(r, 119_999) == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="train.lr_steps must be increasing"):
        TrainRecipe(lr_steps=(5, 3))


def test_epochs_schedule_grows_with_the_labelled_set():
    recipe = TrainRecipe(
        max_iterations=2000, batch_size=8, lr_steps=(1500,), warmup_iterations=100, checkpoint_every=500, epochs=10
    )
    assert recipe.for_images(100).max_iterations == 125  # ceil(10 x 100 / 8)
    small, big = recipe.for_images(200), recipe.for_images(400)
    assert (small.max_iterations, big.max_iterations) == (250, 500)
    assert big.lr_steps == (375,) and big.warmup_iterations == 25 and big.checkpoint_every == 125
    assert learning_rate(big, 374) == pytest.approx(recipe.lr) and learning_rate(big, 375) == pytest.approx(1e-4)
    assert recipe.for_images(10_000).max_iterations == 2000  # max_iterations caps it
    assert recipe.for_images(8).max_iterations == 100  # min_iterations floors it
    assert big.epochs is None and big.for_images(7) == big  # a cycle's recipe is final
    fixed = TrainRecipe(max_iterations=300)
    assert fixed.for_images(100) is fixed and fixed.for_images(400) is fixed
    with pytest.raises(ValueError, match="train.epochs"):
        TrainRecipe(epochs=0)


def test_resumes_from_the_latest_checkpoint():
    context = LocalContext()
    train_worker(spec=SPEC, dataset=Scenes(), recipe=recipe(max_iterations=6), context=context)
    assert [r["iteration"] for r in context.reports] == [3, 6] and context.checkpoint["iteration"] == 6
    train_worker(spec=SPEC, dataset=Scenes(), recipe=recipe(max_iterations=9), context=context)
    assert context.reports[-1]["start_iteration"] == 6 and context.reports[-1]["iteration"] == 9


def test_a_transient_nan_restarts_from_the_last_good_checkpoint(caplog):
    context = LocalContext()
    with caplog.at_level(logging.WARNING, logger="almdn_ray.training"):
        train_worker(spec=SPEC, dataset=Scenes(poison=lambda fetch: fetch == 11), recipe=recipe(), context=context)
    assert "loss diverged at iteration 5; restarting from the checkpoint at iteration 3" in caplog.text
    assert context.reports[-1]["iteration"] == 9 and context.reports[-1]["restarts"] == 1


def test_lasting_divergence_restarts_from_scratch_then_gives_up(caplog):
    context = LocalContext()
    with caplog.at_level(logging.WARNING, logger="almdn_ray.training"), pytest.raises(TrainingDiverged, match="lower"):
        train_worker(spec=SPEC, dataset=Scenes(poison=lambda fetch: fetch > 8), recipe=recipe(), context=context)
    assert "restarting from the checkpoint at iteration 3" in caplog.text
    assert "diverged again at iteration 3; restarting from scratch" in caplog.text


def test_batch_smaller_than_the_workers_is_refused():
    with pytest.raises(ValueError, match="batch_size 1 is smaller than the 2 workers"):
        train_worker(spec=SPEC, dataset=Scenes(), recipe=recipe(batch_size=1), context=LocalContext(world_size=2))


def test_warm_start_begins_from_given_weights():
    torch.manual_seed(5)
    weights = SPEC.build().state_dict()
    context = LocalContext()
    model = train_worker(
        spec=SPEC, dataset=Scenes(), recipe=recipe(max_iterations=1, lr=1e-9), context=context, init_weights=weights
    )
    name = "head.box_head.module_list.0.1.weight"
    torch.testing.assert_close(model.state_dict()[name], weights[name], atol=1e-6, rtol=0)


def test_resuming_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    from almdn_ray.data.transforms import DetectionDataset, train_transform
    from tests.distributed.helpers import SIZE, write_scenes

    spec = ModelSpec(preset="ssdlite320_mobilenet_v3", num_classes=3, image_size=SIZE)
    records = write_scenes(tmp_path, 6)
    augmented = DetectionDataset(records, train_transform(SIZE))  # random crops, flips, colour: all seeded
    whole = LocalContext()
    straight = train_worker(
        spec=spec,
        dataset=augmented,
        recipe=recipe(max_iterations=8, checkpoint_every=2, precise_bn_batches=2),
        context=whole,
    )
    halves = LocalContext()
    train_worker(spec=spec, dataset=augmented, recipe=recipe(max_iterations=5, checkpoint_every=2), context=halves)
    assert halves.checkpoint["iteration"] == 5
    resumed = train_worker(
        spec=spec,
        dataset=augmented,
        recipe=recipe(max_iterations=8, checkpoint_every=2, precise_bn_batches=2),
        context=halves,
    )
    assert halves.reports[-1]["start_iteration"] == 5
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_a_training_step_reads_nothing_back_whatever_the_batch():
    """The step (matching, loss, backward, SGD) leaves every value on the device: no size-dependent op and no
    scalar read, at batch 2 as at batch 8 (the loop reads the losses every ``read_every`` iterations)."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    from almdn_ray import engine
    from almdn_ray.model import MultiboxMixtureLoss

    torch.manual_seed(0)
    model = ModelSpec(preset="ssdlite320_mobilenet_v3", num_classes=3, image_size=160).build()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = MultiboxMixtureLoss(check_targets=False)
    counts = {}
    for size in (2, 8):
        batch = make_images(size, seed=size)
        engine.train_step(model, batch, optimizer, loss_fn, grad_clip=10.0)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.train_step(model, batch, optimizer, loss_fn, grad_clip=10.0)
        names = Counter(event.name for event in prof.events())
        counts[size] = {n: names[n] for n in ("aten::nonzero", "aten::item", "aten::_local_scalar_dense")}
    assert counts[2] == counts[8] and sum(counts[8].values()) <= 1, counts
    checked = MultiboxMixtureLoss()  # the loss's own label check reads the labels: the loop does it on the host
    with pytest.raises(ValueError, match="target 1: labels must be in 1..2"):
        images, targets = make_images(2, seed=0)
        checked(model(images), [targets[0], {**targets[1], "labels": targets[1]["labels"] + 5}])


def test_the_backbone_learns_at_its_multiple_of_the_rate_and_the_head_at_the_rate():
    torch.manual_seed(5)
    weights = SPEC.build().state_dict()
    trained = {}
    for mult in (1.0, 0.0):
        model = train_worker(
            spec=SPEC,
            dataset=Scenes(),
            recipe=recipe(max_iterations=2, lr=1e-3, backbone_lr_mult=mult),
            context=LocalContext(),
            init_weights=weights,
        )
        trained[mult] = model.state_dict()
    backbone, extra, head = (
        "backbone.features.0.0.0.weight",
        "backbone.extra.0.0.0.weight",
        "head.box_head.module_list.0.1.weight",
    )
    assert not torch.equal(trained[1.0][backbone], weights[backbone])  # one rate: the backbone moves
    torch.testing.assert_close(trained[0.0][backbone], weights[backbone], atol=0, rtol=0)  # multiple 0: it stays
    for name in (extra, head):  # the fresh parts learn at the rate either way
        assert not torch.equal(trained[0.0][name], weights[name])
    with pytest.raises(ValueError, match="backbone_lr_mult must be in"):
        recipe(backbone_lr_mult=2.0)
