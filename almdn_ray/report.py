"""Run status (from storage alone) and the report: learning curve, per-cycle table, most uncertain images
(``report.md``), every selection's picks (``report.html``, :mod:`almdn_ray.report_html`)."""

from __future__ import annotations

import io
import logging

import pyarrow.compute as pc

from almdn_ray import diversity, reduce, storage
from almdn_ray.acquisition import is_scored
from almdn_ray.layout import RunLayout
from almdn_ray.state import load_state

logger = logging.getLogger(__name__)

__all__ = ["run_status", "write_report", "pool_duplicates"]


def run_status(run: str) -> dict:
    """Cycles, stages, labelled counts and metrics of a run, read from its storage (no cluster needed)."""
    state = load_state(run)
    if state is None:
        raise FileNotFoundError(f"{run}: no run here (no state.json); check the storage URI")
    layout = RunLayout(run)
    cycles = []
    for k in range(state.cycle + 1):
        entry = {"cycle": k, "stages_done": [h["stage"] for h in state.history if h["cycle"] == k]}
        if storage.exists(layout.cycle(k, "labeled.parquet")):
            entry["labeled"] = storage.read_parquet(layout.cycle(k, "labeled.parquet")).num_rows
        if storage.exists(layout.cycle(k, "metrics.json")):
            metrics = storage.read_json(layout.cycle(k, "metrics.json"))
            entry.update(
                map_voc07=metrics.get("map_voc07"),
                map_area=metrics.get("map_area"),
                coco_ap=metrics.get("coco", {}).get("AP"),
            )
        if storage.exists(layout.cycle(k, "selected.parquet")):
            picked = storage.read_parquet(layout.cycle(k, "selected.parquet"), columns=["score"]).column("score")
            scores = picked.to_numpy(zero_copy_only=False)
            entry["selected"] = len(scores)
            entry["unscored_picks"] = int((~is_scored(scores)).sum())
        if storage.exists(layout.cycle(k, "selected-classes.json")):
            picked_classes = storage.read_json(layout.cycle(k, "selected-classes.json"))
            entry["selected_classes"] = picked_classes["classes"]
            entry["dropped_duplicates"] = picked_classes["dropped_duplicates"]
        unreadable = {}
        if storage.exists(layout.cycle(k, "train-unreadable.json")):
            unreadable["train"] = len(storage.read_json(layout.cycle(k, "train-unreadable.json")))
        if storage.exists(layout.cycle(k, "test-unreadable.json")):
            unreadable["test"] = len(storage.read_json(layout.cycle(k, "test-unreadable.json")))
        if storage.exists(layout.cycle(k, "scores", "_SUCCESS")):
            errors = 0
            for uri in storage.list_files(layout.cycle(k, "scores"), pattern="*.parquet"):
                column = storage.read_parquet(uri, columns=["error"]).column("error")
                errors += len(column) - column.null_count
            unreadable["pool"] = errors
        entry["unreadable"] = unreadable
        cycles.append(entry)
    marker = storage.read_json(layout.pool_marker) if storage.exists(layout.pool_marker) else None
    return {
        "run_id": state.run_id,
        "status": state.status,
        "cycle": state.cycle,
        "stage": state.stage,
        "cycles": cycles,
        "pool": marker.get("rows") if marker else None,
        "pool_additions": marker.get("additions", []) if marker else [],
    }


def curve_png(draw, *, ylabel: str, size: tuple[float, float] = (6, 4)) -> bytes:
    """A learning-curve figure as PNG bytes: ``draw(axis)`` plots, this labels, grids and renders it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=size, dpi=120)
    draw(axis)
    axis.set_xlabel("labelled images")
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _curve(rows: list[dict], label: str | None = None, beside: dict[str, list[dict]] | None = None) -> bytes:
    def draw(axis):
        x = [r["labeled"] for r in rows]
        axis.plot(x, [r["map_voc07"] for r in rows], marker="o", label=f"VOC07 mAP{f' ({label})' if label else ''}")
        axis.plot(x, [r["map_area"] for r in rows], marker="s", label="area mAP")
        for name, other in (beside or {}).items():
            axis.plot(
                [r["labeled"] for r in other],
                [r["map_voc07"] for r in other],
                marker="^",
                linestyle="--",
                label=f"VOC07 mAP ({name}, same seed)",
            )

    return curve_png(draw, ylabel="mAP (IoU 0.5)")


def _beside_table(rows: list[dict], label: str, others: dict[str, list[dict]]) -> list[str]:
    """VOC07 mAP of this run and the runs beside it, by labelled images, and the difference."""
    names = list(others)
    lines = [
        "",
        f"## {label} beside {', '.join(names)}",
        "",
        "The same job, seed and initial labelled set; only the selection differs. VOC07 mAP on the test split:",
        "",
        "| labelled images | "
        + " | ".join([label, *names])
        + " | "
        + " | ".join(f"{label} − {n}" for n in names)
        + " |",
        "|---|" + "---|" * (1 + 2 * len(names)),
    ]
    for r in rows:
        theirs = [next((o["map_voc07"] for o in others[n] if o.get("labeled") == r["labeled"]), None) for n in names]
        cells = [f"{v:.4f}" if v is not None else "–" for v in theirs]
        cells += [f"{r['map_voc07'] - v:+.4f}" if v is not None else "–" for v in theirs]
        lines.append(f"| {r['labeled']} | {r['map_voc07']:.4f} | " + " | ".join(cells) + " |")
    return lines


def _evaluated(run: str) -> list[dict]:
    """The evaluated cycles of a run (for a curve beside another); none if it has not started."""
    try:
        return [c for c in run_status(run)["cycles"] if c.get("map_voc07") is not None]
    except FileNotFoundError:
        return []


def _uncertain_pictures(layout: RunLayout, view: dict, count: int) -> list[tuple[str, str]]:
    """Draw the top ``count`` picks of a selection (``report_html.selection_views``) with their detections."""
    from PIL import Image, ImageDraw

    from almdn_ray.data.images import read_image
    from almdn_ray.data.manifest import read_manifest

    picks = [p for p in view["picks"] if "boxes" in p][:count]
    manifest = read_manifest(layout.pool, ids=[p["id"] for p in picks], columns=["image_id", "uri"]).to_pylist()
    uris = {row["image_id"]: row["uri"] for row in manifest}
    pictures = []
    for pick in picks:
        image = read_image(uris[pick["id"]])
        picture = Image.fromarray(image.permute(1, 2, 0).numpy()).convert("RGB")
        zoom = max(1.0, 480 / max(picture.size))  # small images are enlarged so that the text stays legible
        picture = picture.resize((round(picture.width * zoom), round(picture.height * zoom)), Image.BILINEAR)
        draw = ImageDraw.Draw(picture)
        for x1, y1, x2, y2, label, score, la, le, ca, ce in pick["boxes"]:
            x1, y1, x2, y2 = x1 * zoom, y1 * zoom, x2 * zoom, y2 * zoom
            draw.rectangle([x1, y1, x2, y2], outline=(255, 255, 0), width=2)
            name = view["classes"][label - 1] if label - 1 < len(view["classes"]) else str(label)
            draw.text(
                (x1 + 2, y1 + 2),
                f"{name} {score:.2f}\nloc {la or 0:.2f}/{le or 0:.3f}\ncls {ca or 0:.2f}/{ce or 0:.3f}",
                fill=(255, 255, 0),
            )
        uri = storage.join(layout.report, f"uncertain_{pick['rank']:02d}.png")
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        storage.write_bytes(uri, buffer.getvalue())
        score = f"{pick['score']:.2f}" if pick["score"] is not None else "none: random fill"
        pictures.append((uri, f"{pick['id']} (score {score}, {pick['detections']} detections)"))
    return pictures


def pool_duplicates(run: str, *, cycle: int | None = None, max_distance: float = 0.05) -> dict:
    """Groups of near-duplicate pool images, from the image embeddings of a cycle's score files.

    ``cycle`` (default: the latest scored) picks the score files; they hold the images that cycle scored (the
    unlabelled ones, or the whole pool under ``almdn_diverse``). Exact: every pair is compared, in blocks
    (``N^2 / 2`` dot products: a minute or so per million images on a few cores).

    Returns:
        ``{"cycle", "images", "max_distance", "groups": [[{"image_id", "uri"}, ...], ...]}``, largest group
        first.
    """
    from almdn_ray.data.manifest import read_manifest

    layout = RunLayout(run)
    state = load_state(run)
    if state is None:
        raise FileNotFoundError(f"{run}: no run here (no state.json); check the storage URI")
    scored = [k for k in range(state.cycle + 1) if storage.exists(layout.cycle(k, "scores", "_SUCCESS"))]
    if not scored:
        raise FileNotFoundError(f"{run}: no cycle has scored the pool yet; run the SCORE stage first")
    if cycle is None:
        cycle = scored[-1]
    elif cycle not in scored:
        raise FileNotFoundError(f"{run}: cycle {cycle} has no scores; scored cycles: {scored}")
    table = reduce.read_embeddings(layout.cycle(cycle, "scores"))
    table = table.filter(pc.is_valid(table.column("embedding"))).select(["image_id", "embedding"])
    features = reduce.embedding_matrix(table.column("embedding"))
    if table.num_rows and features.shape[1] == 0:
        raise ValueError(f"{run}: cycle {cycle}'s score files carry no embeddings (acquisition.embedding_dims: 0)")
    groups = diversity.duplicate_groups(features, max_distance) if table.num_rows else []
    ids = table.column("image_id").to_numpy(zero_copy_only=False)
    wanted = sorted({ids[i] for group in groups for i in group})
    uris = {}
    if wanted:
        manifest = read_manifest(layout.pool, ids=wanted)
        uris = dict(zip(manifest.column("image_id").to_pylist(), manifest.column("uri").to_pylist()))
    listed = [[{"image_id": ids[i], "uri": uris.get(ids[i])} for i in group] for group in groups]
    return {"cycle": cycle, "images": table.num_rows, "max_distance": max_distance, "groups": listed}


def _write_page(layout: RunLayout, status: dict, summary: str, curve: bytes | None, views: list[dict]) -> str:
    """``report/report.html`` (see :mod:`almdn_ray.report_html`)."""
    import base64

    from almdn_ray.acquisition import TERMS
    from almdn_ray.report_html import render_page

    table = []
    for c in status["cycles"]:
        if c.get("map_voc07") is None:
            continue
        table.append(
            {
                "cycle": c["cycle"],
                "labeled": c.get("labeled"),
                "map_voc07": c["map_voc07"],
                "map_area": c["map_area"],
                "coco_ap": c.get("coco_ap"),
                "selected": c.get("selected"),
                "unscored": c.get("unscored_picks"),
                "dropped_duplicates": c.get("dropped_duplicates"),
                "selected_classes": c.get("selected_classes"),
                "unreadable": " / ".join(str(c["unreadable"].get(key, "–")) for key in ("train", "test", "pool")),
            }
        )
    data = {
        "run_id": status["run_id"],
        "summary": summary,
        "curve": "data:image/png;base64," + base64.b64encode(curve).decode("ascii") if curve else None,
        "terms": list(TERMS),
        "table": table,
        "selections": views,
    }
    page = storage.join(layout.report, "report.html")
    storage.write_bytes(page, render_page(data).encode("utf-8"))
    return page


def write_report(
    run: str, *, pictures: int = 6, label: str | None = None, beside: dict[str, str] | None = None
) -> dict[str, str]:
    """Write ``report/curve.png``, ``report/report.md`` (with pictures of the most uncertain images of the latest
    selection) and ``report/report.html`` (every selection's picks, sortable and filterable).

    Args:
        label: what this run is called beside others (its strategy).
        beside: other runs from the same initial labelled set (name -> run URI, e.g. ``{"random": ...}``): their
            VOC07 mAP is drawn on the same curve and tabled beside this run's, labelled size by size.
    """
    from almdn_ray.report_html import selection_views

    layout = RunLayout(run)
    status = run_status(run)
    rows = [c for c in status["cycles"] if c.get("map_voc07") is not None]
    where = (
        f" (cycle {status['cycle']}, next stage {status['stage']}); "
        f"pool: {status['pool'] if status['pool'] is not None else '?'} images"
        + "".join(f"; {a['rows']} added before cycle {a['cycle']}" for a in status["pool_additions"])
        + "."
    )
    summary = f"Status: {status['status']}{where}"
    lines = [f"# almdn-ray report — run {status['run_id']}", "", f"Status: **{status['status']}**{where}", ""]
    views = selection_views(run)
    curve = None
    if not rows:
        lines.append("No cycle has been evaluated yet.")
        markdown = storage.join(layout.report, "report.md")
        storage.write_bytes(markdown, ("\n".join(lines) + "\n").encode())
        return {"curve": None, "markdown": markdown, "html": _write_page(layout, status, summary, None, views)}
    others = {name: _evaluated(uri) for name, uri in (beside or {}).items()}
    curve = storage.join(layout.report, "curve.png")
    curve_bytes = _curve(rows, label, others)
    storage.write_bytes(curve, curve_bytes)
    lines += [
        "![mAP against labelled images](curve.png)",
        "",
        "Every selection's picks with their boxes and terms, sortable and filterable: [report.html](report.html).",
        "",
        "| cycle | labelled images | VOC07 mAP | area mAP | COCO AP | selected (of them unscored: random fill) "
        "| unreadable images (train / test / pool) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        coco = f"{r['coco_ap']:.4f}" if r.get("coco_ap") is not None else "–"
        bad = " / ".join(str(r["unreadable"].get(key, "–")) for key in ("train", "test", "pool"))
        picks = f"{r['selected']} ({r['unscored_picks']})" if "selected" in r else "–"
        lines.append(
            f"| {r['cycle']} | {r['labeled']} | {r['map_voc07']:.4f} | {r['map_area']:.4f} | {coco} | {picks} | {bad} |"
        )
    if others:
        lines += _beside_table(rows, label or "this run", others)
    if any(r.get("unscored_picks") for r in rows):
        lines += [
            "",
            "Unscored picks: images with no detection at `acquisition.min_confidence`, which no uncertainty can "
            "rank; they fill the budget by a seeded random draw.",
        ]
    histograms = [c for c in status["cycles"] if c.get("selected_classes")]
    if histograms:
        names = sorted({name for c in histograms for name in c["selected_classes"]}, key=lambda n: (n == "none", n))
        lines += [
            "",
            "## Predicted classes of each selection",
            "",
            "Each pick counted under the class of its most confident detection (`none`: no confident detection); "
            "near-duplicates left out: candidates `almdn_diverse` dropped for lying within `min_distance` of a "
            "pick or a labelled image.",
            "",
            "| cycle | " + " | ".join(names) + " | near-duplicates left out |",
            "|---|" + "---|" * (len(names) + 1),
        ]
        for c in histograms:
            counts = " | ".join(str(c["selected_classes"].get(name, 0)) for name in names)
            lines.append(f"| {c['cycle']} | {counts} | {c['dropped_duplicates']} |")
    try:
        drawn = _uncertain_pictures(layout, views[-1], pictures) if views else []
    except Exception as error:  # pictures are a courtesy: a report without them is still a report
        logger.warning("could not draw the most uncertain images: %s", error)
        drawn = []
    if drawn:
        lines += [
            "",
            "## Most uncertain images of the latest selection",
            "",
            "Boxes: class, confidence; `loc` aleatoric/epistemic, `cls` aleatoric/epistemic.",
            "",
        ]
        lines += [f"![{caption}]({uri.rsplit('/', 1)[-1]})  \n{caption}" for uri, caption in drawn]
    markdown = storage.join(layout.report, "report.md")
    storage.write_bytes(markdown, ("\n".join(lines) + "\n").encode())
    return {"curve": curve, "markdown": markdown, "html": _write_page(layout, status, summary, curve_bytes, views)}
