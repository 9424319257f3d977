"""Cost of the mixture head: SSD300-GMM (K=4) against plain SSD300, side by side in one run.

Prints, for batch sizes 1 and 8: forward time of each model (median of interleaved repeats), their time
ratio, their multiply-accumulate ratio, the throughput (GMAC/s) of the backbone and of each head alone,
and post-processing + uncertainty time per image (scoring settings; evaluation settings with the
low-confidence tail and a per-class top-400 before NMS). Target: at batch 8 the time ratio is within 5% of
the MAC ratio (the mixture head costs nothing beyond its arithmetic).

    python bench/overhead.py [--repeats 5] [--batch-sizes 1 8] [--num-classes 21] [--components 4]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from almdn_ray.model import PostprocessConfig, build_plain_ssd, build_ssdgmm, postprocess
from almdn_ray.model.anchors import make_box_coder


def count_macs(model: nn.Module, *inputs, batch_size: int = 1) -> int:
    """Multiply-accumulates per image of ``model(*inputs)`` on a batch of ``batch_size``.

    Counts every Conv2d and Linear layer, which is where all of SSD's arithmetic is.
    """
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.inference_mode():
        model(*inputs)
    for handle in handles:
        handle.remove()
    return total // batch_size


def time_interleaved(models: dict[str, nn.Module], images: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median forward seconds of each model; the models alternate within every repeat."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(images)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(images)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def time_postprocess(model: nn.Module, images: torch.Tensor, config: PostprocessConfig, repeats: int) -> float:
    """Median seconds per image of decoding, mixture moments, NMS and uncertainty gathering."""
    coder = make_box_coder()
    with torch.inference_mode():
        outputs = model(images)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            postprocess(outputs, box_coder=coder, image_size=tuple(images.shape[-2:]), config=config)
            samples.append(time.perf_counter() - start)
    return statistics.median(samples) / images.shape[0]


def time_parts(models: dict[str, nn.Module], images: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of the shared backbone and of each head alone on the same feature maps."""
    plain, gmm = models["plain"], models["gmm"]
    with torch.inference_mode():
        features, anchors = plain.features(images)
        parts = {
            "backbone": lambda: plain.backbone((images - plain.image_mean) / plain.image_std),
            "plain head": lambda: plain.head(features),
            "gmm head": lambda: gmm.head(features, anchors),
        }
        seconds = {}
        for name, run in parts.items():
            run()
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                samples.append(time.perf_counter() - start)
            seconds[name] = statistics.median(samples)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--components", type=int, default=4)
    args = parser.parse_args()

    torch.manual_seed(0)
    models = {
        "plain": build_plain_ssd("ssd300_vgg16", num_classes=args.num_classes).eval(),
        "gmm": build_ssdgmm("ssd300_vgg16", num_classes=args.num_classes, num_components=args.components).eval(),
    }
    print(
        f"# bench/overhead.py — {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, SSD300-VGG16, C={args.num_classes}, K={args.components}, random weights"
    )
    probe = torch.rand(1, 3, 300, 300)
    macs = {name: count_macs(model, probe) for name, model in models.items()}
    mac_ratio = macs["gmm"] / macs["plain"]
    print(f"MACs per image: plain {macs['plain'] / 1e9:.2f} G, gmm {macs['gmm'] / 1e9:.2f} G, ratio {mac_ratio:.3f}")
    features, anchors = models["plain"].features(probe)
    part_macs = {
        "backbone": count_macs(models["plain"].backbone, probe),
        "plain head": count_macs(models["plain"].head, features),
        "gmm head": count_macs(models["gmm"].head, features, anchors),
    }
    assert part_macs["backbone"] + part_macs["gmm head"] == macs["gmm"], (part_macs, macs)
    print("| batch | plain s | gmm s | time ratio | MAC ratio | time/MAC | post-process ms/img (score / eval) |")
    print("|---|---|---|---|---|---|---|")
    throughput = {}
    for batch_size in args.batch_sizes:
        images = torch.rand(batch_size, 3, 300, 300)
        seconds = time_interleaved(models, images, args.repeats)
        ratio = seconds["gmm"] / seconds["plain"]
        scoring = time_postprocess(models["gmm"], images, PostprocessConfig(), args.repeats)
        evaluation = time_postprocess(
            models["gmm"], images, PostprocessConfig(min_confidence=0.0, pre_nms_top_k=400), args.repeats
        )
        parts = time_parts(models, images, args.repeats)
        throughput[batch_size] = {name: part_macs[name] * batch_size / parts[name] / 1e9 for name in parts}
        print(
            f"| {batch_size} | {seconds['plain']:.3f} | {seconds['gmm']:.3f} | {ratio:.3f} | {mac_ratio:.3f} | "
            f"{ratio / mac_ratio:.3f} | {scoring * 1e3:.1f} / {evaluation * 1e3:.1f} |"
        )
    print("\nThroughput of each part alone (GMAC/s); a head that runs faster per MAC than the backbone makes the")
    print("time ratio fall below the MAC ratio:")
    for batch_size, parts in throughput.items():
        print(f"batch {batch_size}: " + ", ".join(f"{name} {value:.0f}" for name, value in parts.items()))


if __name__ == "__main__":
    main()
