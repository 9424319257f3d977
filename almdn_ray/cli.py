"""The ``almdn-ray`` command line. A command parses, loads config and calls one function."""

from __future__ import annotations

import typer

from almdn_ray import __version__

app = typer.Typer(
    name="almdn-ray",
    help="Active learning for object detection with AL-MDN, distributed on Ray.",
    no_args_is_help=True,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"almdn-ray {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Active learning for object detection with AL-MDN, distributed on Ray."""


@app.command()
def models() -> None:
    """List the model presets: input size, backbone and head layout."""
    from almdn_ray.model import PRESETS

    for name, preset in PRESETS.items():
        head = "depthwise-separable" if preset.separable_head else "3x3 conv"
        typer.echo(f"{name}: {preset.image_size}x{preset.image_size} input, {preset.backbone} backbone, {head} head")
