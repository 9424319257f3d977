"""Ensemble training in the driver, and the experiment's plan and table (local stand-ins for the heavy stages;
the Ray experiment end to end is in test_end_to_end.py)."""

import math

import pytest

from almdn_ray import storage
from almdn_ray.config import SpecError, spec_from_dict, spec_to_dict
from almdn_ray.cycle import Driver, RunLayout, labeled_ids
from almdn_ray.experiment import (
    collect,
    plan_runs,
    run_experiment,
    summarize,
    write_experiment_report,
    write_run_reports,
)
from tests.test_cycle import Recorder, demo, job  # noqa: F401  (demo is a fixture)


def test_an_ensemble_trains_its_members_with_their_own_seeds_and_scores_with_all(demo, tmp_path):  # noqa: F811
    spec = job(demo, tmp_path, cycles=2, strategy="ensemble", ensemble_size=3)
    failing = Recorder(fail_train="cycle-000-member-2")
    with pytest.raises(RuntimeError, match="lost its worker"):
        Driver(spec, failing.functions()).run()
    assert [c[1] for c in failing.calls] == ["cycle-000", "cycle-000-member-1"]
    resumed = Recorder()
    assert Driver(spec, resumed.functions()).run().status == "finished"
    trained = [c[1] for c in resumed.calls if c[0] == "train"]
    assert trained == ["cycle-000-member-2", "cycle-001", "cycle-001-member-1", "cycle-001-member-2"]
    assert len(set(resumed.train_seeds[1:])) == 3  # three members, three seeds
    layout = RunLayout(str(tmp_path))
    assert resumed.members == [[storage.join(layout.cycle(0, "train", f"member-{m}"), "model.pt") for m in (1, 2)]]
    assert [c[1] for c in resumed.calls if c[0] == "eval"] == [layout.cycle(k, "train", "model.pt") for k in (0, 1)]
    assert len(labeled_ids(layout, 1)) == 15


def base_job(demo, out, **acquisition):  # noqa: F811
    return spec_from_dict(
        {
            "name": "exp",
            "seed": 5,
            "storage": {"uri": str(out / "unused")},
            "dataset": {"train": str(demo["pool"]), "test": str(demo["test"])},
            "train": {"seed": 11},
            "model": {"image_size": 96},  # reports build the model (the stand-in stages never do): keep it small
            "acquisition": {"initial_labeled": 10, "budget": 5, "cycles": 3, **acquisition},
        }
    )


def test_the_plan_pairs_strategies_by_seed_and_reads_per_strategy_seed_counts(demo, tmp_path):  # noqa: F811
    runs = plan_runs(base_job(demo, tmp_path), ["almdn", "random", "mc_dropout:1"], 2, str(tmp_path / "exp"))
    assert [(r.strategy, r.seed) for r in runs] == [
        ("almdn", 0),
        ("random", 0),
        ("mc_dropout", 0),
        ("almdn", 1),
        ("random", 1),
    ]
    assert [(r.job.seed, r.job.train.seed) for r in runs] == [(5, 11)] * 3 + [(6, 12)] * 2
    assert runs[4].job.storage.uri == storage.join(str(tmp_path / "exp"), "random", "seed-1")
    assert runs[4].job.acquisition.strategy == "random" and runs[4].job.model.dropout == 0.0
    assert runs[2].job.model.dropout == 0.1  # mc_dropout needs dropout; the others keep the job's model
    for bad, message in [
        (["almdn", "almdn"], "twice"),
        (["nope"], "unknown 'nope'"),
        (["almdn:0"], "integer >= 1"),
        ([], "at least one"),
    ]:
        with pytest.raises(SpecError, match=message):
            plan_runs(base_job(demo, tmp_path), bad, 1, str(tmp_path / "exp"))
    human = spec_from_dict({**spec_to_dict(base_job(demo, tmp_path)), "labels": {"mode": "human"}})
    with pytest.raises(SpecError, match="labels.mode is 'human'"):
        plan_runs(human, ["almdn"], 1, str(tmp_path / "exp"))


class Graded(Recorder):
    """mAP grows with the labelled set, faster for almdn: the table's numbers are known in advance."""

    def evaluate(self, weights, dataset, spec, job):
        self.calls.append(("eval", weights))
        labelled = len(labeled_ids(RunLayout(weights.split("/cycles/")[0]), int(weights.split("/cycles/")[1][:3])))
        gain = 0.02 if job.acquisition.strategy == "almdn" else 0.01
        value = 0.1 + gain * (labelled - 10) / 5 + 0.002 * (job.seed - 5)
        return {"map_voc07": value, "map_area": value, "coco": {"AP": 0.0}}


def test_the_experiment_table_has_mean_std_per_size_and_paired_areas(demo, tmp_path):  # noqa: F811
    runs = plan_runs(base_job(demo, tmp_path), ["almdn", "random"], 2, str(tmp_path / "exp"))
    graded = Graded()
    run_experiment(runs, graded.functions())
    # Each seed's first cycle is trained and evaluated once: random starts from almdn's cycle-0 model.
    trained = [c[1] for c in graded.calls if c[0] == "train"]
    assert trained == ["cycle-000", "cycle-001", "cycle-002", "cycle-001", "cycle-002"] * 2
    evaluated = [c[1] for c in graded.calls if c[0] == "eval"]
    assert len(evaluated) == 10 and not any("/random/" in e and "/cycles/000/" in e for e in evaluated)
    for seed in (0, 1):
        first, second = (RunLayout(r.job.storage.uri) for r in runs if r.seed == seed)
        assert storage.read_json(second.cycle(0, "metrics.json")) == storage.read_json(first.cycle(0, "metrics.json"))
        assert storage.read_bytes(second.cycle(0, "train", "model.pt")) == b"weights"
    paths = write_experiment_report(runs, str(tmp_path / "report"), command="almdn-ray experiment job.yaml")
    table = paths["table"]
    assert table["sizes"] == [10, 15, 20] and table["pending"] == []
    almdn, random = table["rows"]
    assert almdn["strategy"] == "almdn" and almdn["seeds"] == [0, 1]
    assert almdn["map"][20][0] == pytest.approx(0.141) and almdn["map"][20][1] == pytest.approx(math.sqrt(0.002**2 / 2))
    assert random["map"][20][0] == pytest.approx(0.121)
    # AUC = trapezoid over [10, 20] / 10: the mean of a straight line = its midpoint value.
    assert almdn["auc"][0] == pytest.approx(0.121) and random["auc"][0] == pytest.approx(0.111)
    assert almdn["paired_auc_vs_random"] == pytest.approx((0.01, 0.0)) and almdn["paired_wins"] == [2, 2]
    markdown = storage.read_bytes(paths["markdown"]).decode()
    assert (
        "| almdn | 2 | 0.101 ± 0.001 | 0.121 ± 0.001 | 0.141 ± 0.001 | 0.121 ± 0.001 | 0.010 ± 0.000 | - | 2/2 |"
        in (markdown)
    )
    assert "almdn-ray experiment job.yaml" in markdown
    assert storage.read_bytes(paths["plot"])[:4] == b"\x89PNG"
    for seed in (0, 1):  # paired: each seed's strategies started from one labelled set
        first = [labeled_ids(RunLayout(r.job.storage.uri), 0) for r in runs if r.seed == seed]
        assert first[0] == first[1]
    assert labeled_ids(RunLayout(runs[0].job.storage.uri), 0) != labeled_ids(RunLayout(runs[2].job.storage.uri), 0)
    again = Graded()
    run_experiment(runs, again.functions())  # finished runs are not redone
    assert again.calls == []
    # Every run's report has the other strategy of its seed beside it, size by size.
    reports = write_run_reports(runs)
    assert len(reports) == 4 and all("/seed-" in r for r in reports)
    almdn_report = storage.read_bytes(reports[0]).decode()
    assert "## almdn beside random" in almdn_report
    assert "| 20 | 0.1400 | 0.1200 | +0.0200 |" in almdn_report and "| 10 | 0.1000 | 0.1000 | +0.0000 |" in almdn_report
    assert "## random beside almdn" in storage.read_bytes(reports[1]).decode()


def test_a_first_cycle_is_not_reused_from_a_run_that_differs(demo, tmp_path):  # noqa: F811
    base = base_job(demo, tmp_path)
    runs = plan_runs(base, ["almdn", "mc_dropout"], 1, str(tmp_path / "exp"))  # mc_dropout: another model
    recorder = Graded()
    run_experiment(runs, recorder.functions())
    assert [c[1] for c in recorder.calls if c[0] == "train"].count("cycle-000") == 2
    other_seed = plan_runs(base, ["random"], 2, str(tmp_path / "exp2"))[1]  # another initial labelled set
    Driver(other_seed.job, recorder.functions(), first_cycle_from=runs[0].job.storage.uri).run()
    assert [c[1] for c in recorder.calls if c[0] == "train"].count("cycle-000") == 3


def test_an_unfinished_run_is_listed_not_averaged(demo, tmp_path):  # noqa: F811
    runs = plan_runs(base_job(demo, tmp_path), ["almdn", "random"], 1, str(tmp_path / "exp"))
    run_experiment(runs[:1], Graded().functions())
    table = summarize(collect(runs), runs[0].job.acquisition.cycles)
    assert [row["seeds"] for row in table["rows"]] == [[0], []]
    assert table["pending"] == [runs[1].job.storage.uri]
    assert math.isnan(table["rows"][0]["paired_auc_vs_random"][0])
