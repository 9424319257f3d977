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
