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
