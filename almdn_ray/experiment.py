"""Strategy comparisons: the same job once per strategy and seed, then one table and one plot.

Runs are paired: every strategy of seed ``s`` starts from the same initial labelled set and the same
first model (``seed`` and ``train.seed`` both shifted by ``s``), so differences between strategies at
the same seed come from what they selected. Each run is an ordinary resumable run in its own folder
``OUT/<strategy>/seed-<s>``; running the experiment again continues where it stopped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from almdn_ray import acquisition, storage
from almdn_ray.config import JobSpec, SpecError
from almdn_ray.cycle import Driver, RunLayout, StageFunctions
from almdn_ray.state import load_state

logger = logging.getLogger(__name__)

__all__ = [
    "PlannedRun", "plan_runs", "run_experiment", "collect", "summarize", "write_experiment_report", "write_run_reports"
]  # fmt: skip

DEFAULT_MC_DROPOUT = 0.1


@dataclass(frozen=True)
class PlannedRun:
    strategy: str
    seed: int
    job: JobSpec


def plan_runs(
    base: JobSpec, strategies: Sequence[str], seeds: int, out: str, *, mc_dropout: float = DEFAULT_MC_DROPOUT
) -> list[PlannedRun]:
    """One job per (seed, strategy), seed-major, so that a stopped experiment has whole pairs first.

    Args:
        strategies: names, each optionally ``name:N`` to give that strategy N seeds instead of ``seeds``
            (e.g. ``ensemble:1``: the multi-model baselines cost more).
        mc_dropout: the head dropout given to ``mc_dropout`` runs whose job has none (the other strategies
            keep the job's model unchanged).
    """
    counts: dict[str, int] = {}
    for item in strategies:
        name, _, n = item.partition(":")
        if name in counts:
            raise SpecError(f"--strategies: {list(strategies)} names {name!r} twice")
        if name not in acquisition.STRATEGIES:
            raise SpecError(f"--strategies: unknown {name!r}; choose from {sorted(acquisition.STRATEGIES)}")
        if n and not (n.isdigit() and int(n) >= 1):
            raise SpecError(f"--strategies: {item!r}: the seed count after ':' must be an integer >= 1")
        counts[name] = int(n) if n else seeds
    if not counts:
        raise SpecError("--strategies: name at least one strategy, e.g. almdn,random")
    if seeds < 1:
        raise SpecError(f"--seeds must be >= 1, got {seeds}")
    if base.labels.mode != "simulate":
        raise SpecError(
            f"labels.mode is {base.labels.mode!r}: an experiment reveals the dataset's labels; set simulate"
        )
    runs = []
    for s in range(max(counts.values())):
        for strategy in [name for name, n in counts.items() if s < n]:
            model = base.model
            if strategy == "mc_dropout" and model.dropout <= 0:
                model = replace(model, dropout=mc_dropout)
            job = replace(
                base,
                name=f"{base.name}-{strategy}-seed{s}",
                seed=base.seed + s,
                model=model,
                train=replace(base.train, seed=base.train.seed + s),
                storage=replace(base.storage, uri=storage.join(out, strategy, f"seed-{s}")),
                acquisition=replace(base.acquisition, strategy=strategy),
            )
            runs.append(PlannedRun(strategy, s, job))
    return runs


def run_experiment(
    runs: Sequence[PlannedRun], functions: StageFunctions, *, progress: Callable[[str], None] | None = None
) -> None:
    """Run (or resume) every planned run, one after another; finished runs are skipped by their driver."""
    say = progress or (lambda message: None)
    for i, run in enumerate(runs):
        say(f"run {i + 1}/{len(runs)}: {run.strategy}, seed {run.seed} -> {run.job.storage.uri}")
        # The seed's first run trains cycle 0; the others reuse its model where their driver finds it the same.
        first = next(r for r in runs if r.seed == run.seed)
        state = Driver(
            run.job,
            functions,
            progress=lambda m, r=run: say(f"{r.strategy}/seed-{r.seed}: {m}"),
            first_cycle_from=first.job.storage.uri if first is not run else None,
        ).run()
        if state.status != "finished":
            raise RuntimeError(
                f"{run.job.storage.uri} stopped with status {state.status!r}: an experiment needs labels.mode simulate"
            )


def write_run_reports(runs: Sequence[PlannedRun]) -> list[str]:
    """Each finished run's report (``report.md``, ``report.html``), with the other strategies of its seed beside
    it (same initial labelled set). Returns the markdown URIs."""
    from almdn_ray.report import write_report

    written = []
    for run in runs:
        if (state := load_state(run.job.storage.uri)) is None or state.status != "finished":
            continue
        beside = {r.strategy: r.job.storage.uri for r in runs if r.seed == run.seed and r is not run}
        written.append(write_report(run.job.storage.uri, label=run.strategy, beside=beside)["markdown"])
    return written


def _scoring_seconds(layout: RunLayout, k: int) -> tuple[float, int]:
    """Model time (sum of the per-image ``seconds`` column) and images scored in cycle ``k``."""
    from almdn_ray.reduce import read_scores

    folder = layout.cycle(k, "scores")
    if not storage.exists(storage.join(folder, "_SUCCESS")):
        return 0.0, 0
    table = read_scores(folder)
    return float(np.nansum(table.column("seconds").to_numpy(zero_copy_only=False))), table.num_rows


def collect(runs: Sequence[PlannedRun]) -> list[dict]:
    """Per run: its curve (labelled, VOC07 mAP, COCO AP per finished cycle), the first labelled set, costs."""
    results = []
    for run in runs:
        layout = RunLayout(run.job.storage.uri)
        state = load_state(layout.run)
        entry = {"strategy": run.strategy, "seed": run.seed, "run": layout.run, "finished": False, "curve": []}
        if state is None:
            results.append(entry)
            continue
        entry["finished"] = state.status == "finished"
        entry["initial"] = storage.read_parquet(layout.cycle(0, "labeled.parquet")).column("image_id").to_pylist()
        for k in range(run.job.acquisition.cycles):
            if not storage.exists(layout.cycle(k, "metrics.json")):
                break
            metrics = storage.read_json(layout.cycle(k, "metrics.json"))
            entry["curve"].append(
                {"labeled": metrics["labeled"], "map_voc07": metrics["map_voc07"], "coco_ap": metrics["coco"]["AP"]}
            )
        seconds = {stage: [h["seconds"] for h in state.history if h["stage"] == stage] for stage in ("train", "score")}
        model_seconds, images = map(sum, zip(*(_scoring_seconds(layout, k) for k in range(state.cycle + 1))))
        entry["train_s_per_cycle"] = float(np.mean(seconds["train"])) if seconds["train"] else None
        entry["score_stage_s_per_cycle"] = float(np.mean(seconds["score"])) if seconds["score"] else None
        entry["score_ms_per_image"] = 1000 * model_seconds / images if images else None
        results.append(entry)
    return results


def _area(curve: list[dict]) -> float:
    """Area under mAP-vs-labelled by the trapezoid rule over the labelled range: the curve's mean mAP."""
    x = np.array([p["labeled"] for p in curve], np.float64)
    y = np.array([p["map_voc07"] for p in curve], np.float64)
    if len(x) < 2 or x[-1] == x[0]:
        return float(y.mean()) if len(y) else math.nan
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(results: Sequence[dict], cycles: int) -> dict:
    """The table: per strategy, mAP mean/std per labelled size and the area under the curve (finished runs).

    ``paired_auc_vs_random`` is the mean and std over seeds of (strategy AUC - random AUC at the same seed).
    """
    strategies = list(dict.fromkeys(r["strategy"] for r in results))
    finished = [r for r in results if r["finished"] and len(r["curve"]) == cycles]
    sizes = sorted({p["labeled"] for r in finished for p in r["curve"]})
    random_auc = {r["seed"]: _area(r["curve"]) for r in finished if r["strategy"] == "random"}
    rows = []
    for strategy in strategies:
        mine = [r for r in finished if r["strategy"] == strategy]
        row = {"strategy": strategy, "seeds": sorted(r["seed"] for r in mine), "map": {}}
        for size in sizes:
            values = [p["map_voc07"] for r in mine for p in r["curve"] if p["labeled"] == size]
            row["map"][size] = _mean_std(values)
        row["auc"] = _mean_std([_area(r["curve"]) for r in mine])
        paired = [_area(r["curve"]) - random_auc[r["seed"]] for r in mine if r["seed"] in random_auc]
        row["paired_auc_vs_random"] = _mean_std(paired) if strategy != "random" else (math.nan, math.nan)
        # The paired differences' standard error, and on how many seeds the strategy beat random.
        row["paired_se"] = row["paired_auc_vs_random"][1] / math.sqrt(len(paired)) if len(paired) > 1 else math.nan
        row["paired_wins"] = [sum(d > 0 for d in paired), len(paired)] if strategy != "random" else None
        for key in ("score_ms_per_image", "train_s_per_cycle", "score_stage_s_per_cycle"):
            row[key] = _mean_std([r.get(key) for r in mine])[0]
        rows.append(row)
    return {"sizes": sizes, "rows": rows, "pending": [r["run"] for r in results if r not in finished]}


def _fmt(pair: tuple[float, float], digits: int = 3) -> str:
    mean, std = pair
    return "-" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _markdown(table: dict, command: str | None) -> str:
    sizes = table["sizes"]
    lines = [
        "# Strategy comparison",
        "",
        "VOC07 mAP (11-point, IoU 0.5) on the test split: mean ± std over seeds (paired: each seed's strategies "
        "share their initial labelled set). AUC: area under mAP vs labelled images over the labelled range, "
        "divided by that range (the curve's mean mAP). ΔAUC: per-seed AUC minus random's at the same seed (mean ± "
        "std; SE: std / √seeds; wins: seeds with ΔAUC > 0). "
        "Scoring: model time per pool image (read, forward passes, uncertainties), from the score files; "
        "train: seconds per cycle (all ensemble members).",
        "",
    ]
    if command:
        lines += ["Command:", "", f"    {command}", ""]
    header = ["strategy", "seeds"] + [f"mAP @ {s}" for s in sizes]
    header += ["AUC", "ΔAUC vs random", "ΔAUC / SE", "wins", "scoring ms/img"]
    header += ["train s/cycle"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table["rows"]:
        cells = [row["strategy"], str(len(row["seeds"]))]
        cells += [_fmt(row["map"][s]) for s in sizes]
        cells += [_fmt(row["auc"]), _fmt(row["paired_auc_vs_random"])]
        se, mean = row.get("paired_se", math.nan), row["paired_auc_vs_random"][0]
        cells.append("-" if math.isnan(se) or se == 0 else f"{mean / se:+.1f}")
        wins = row.get("paired_wins")
        cells.append(f"{wins[0]}/{wins[1]}" if wins and wins[1] else "-")
        cells += [
            "-" if math.isnan(row["score_ms_per_image"]) else f"{row['score_ms_per_image']:.1f}",
            "-" if math.isnan(row["train_s_per_cycle"]) else f"{row['train_s_per_cycle']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if table["pending"]:
        lines += ["", "Not finished (left out of the table): " + ", ".join(table["pending"])]
    return "\n".join(lines) + "\n"


def _plot(results: Sequence[dict], table: dict) -> bytes:
    from almdn_ray.report import curve_png

    sizes = np.array(table["sizes"], np.float64)

    def draw(axis):
        for row in table["rows"]:
            if not row["seeds"]:
                continue
            mean = np.array([row["map"][s][0] for s in table["sizes"]])
            curves = np.array(
                [
                    [p["map_voc07"] for p in r["curve"]]
                    for r in results
                    if r["strategy"] == row["strategy"] and r["seed"] in row["seeds"]
                ]
            )
            (line,) = axis.plot(sizes, mean, marker="o", label=f"{row['strategy']} ({len(row['seeds'])} seeds)")
            if len(curves) > 1:  # the band spans the seeds' lowest and highest mAP
                axis.fill_between(sizes, curves.min(axis=0), curves.max(axis=0), color=line.get_color(), alpha=0.15)

    return curve_png(draw, ylabel="VOC07 mAP on the test split", size=(7, 4.5))


def write_experiment_report(
    runs: Sequence[PlannedRun], report_to: str, *, command: str | None = None
) -> dict[str, str]:
    """Collect every run, write ``experiment.md``, ``experiment.json`` and ``experiment.png`` to ``report_to``.

    Returns:
        The written URIs by kind, and the table under ``"table"``.
    """
    cycles = runs[0].job.acquisition.cycles
    results = collect(runs)
    table = summarize(results, cycles)
    by_seed: dict[int, list] = {}
    for r in results:
        if "initial" in r:
            by_seed.setdefault(r["seed"], []).append(r["initial"])
    paired = all(all(initial == group[0] for initial in group) for group in by_seed.values())
    if not paired:
        raise RuntimeError("runs of the same seed started from different labelled sets; the comparison is unpaired")
    paths = {
        "markdown": storage.join(report_to, "experiment.md"),
        "json": storage.join(report_to, "experiment.json"),
        "plot": storage.join(report_to, "experiment.png"),
    }
    storage.write_bytes(paths["markdown"], _markdown(table, command).encode())
    storage.write_json(
        paths["json"],
        {
            "command": command,
            "table": {
                **table,
                "rows": [{**row, "map": {str(k): v for k, v in row["map"].items()}} for row in table["rows"]],
            },
            "runs": [{k: v for k, v in r.items() if k != "initial"} for r in results],
        },
    )
    if table["sizes"]:
        storage.write_bytes(paths["plot"], _plot(results, table))
    return {**paths, "table": table}
