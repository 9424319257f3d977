from typer.testing import CliRunner

from almdn_ray import __version__
from almdn_ray.cli import app
from almdn_ray.model import PRESETS

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"almdn-ray {__version__}"


def test_models_lists_every_preset():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    for name, preset in PRESETS.items():
        assert f"{name}: {preset.image_size}x{preset.image_size}" in result.output


def test_unknown_command_fails():
    result = runner.invoke(app, ["frobnicate"])
    assert result.exit_code != 0


def test_every_command_names_its_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("acquisition:\n  budgett: 5\n")
    unreachable = "http://127.0.0.1:9"  # discard port: nothing answers
    cases = [
        (["run", str(tmp_path / "missing.yaml")], "job spec not found"),
        (["run", str(bad)], "acquisition: unknown key(s) ['budgett']"),
        (["submit", str(bad), "--address", unreachable], "unknown key(s) ['budgett']"),
        (["status", str(tmp_path / "norun")], "no run here (no state.json)"),
        (["report", str(tmp_path / "norun")], "no run here (no state.json)"),
        (["labels", "export", str(tmp_path / "norun")], "no run here (no job.yaml)"),
        (["labels", "import", str(tmp_path / "norun"), str(tmp_path / "x.json")], "no run here (no job.yaml)"),
        (["logs", "raysubmit_x", "--address", unreachable], "cannot reach the Ray job server"),
        (["stop", "raysubmit_x", "--address", unreachable], "cannot reach the Ray job server"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)


def test_run_that_fits_no_node_fails_naming_the_request_and_the_nodes(ray_session, tmp_path):
    import yaml

    from almdn_ray.data.demo import DemoConfig, build_demo

    demo = build_demo(
        tmp_path / "demo", pool_images=12, test_images=2, config=DemoConfig(image_size=96, digit_size=(24, 48))
    )
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "storage": {"uri": str(tmp_path / "run")},
                "dataset": {"train": str(demo["pool"]), "test": str(demo["test"])},
                "model": {"image_size": 96},
                "acquisition": {"initial_labeled": 4, "budget": 2, "cycles": 1},
                "resources": {"cpus_per_worker": 64, "placement_timeout_s": 0},
            }
        )
    )
    result = runner.invoke(app, ["run", str(job)])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "cannot place training workers: 1 x {64 CPU} on the nodes seen (head" in text, text
    assert "2 CPU, 0 GPU" in text and "lower resources.cpus_per_worker" in text
