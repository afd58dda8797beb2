"""The argument types and shared options of the `echolm` command line (echolm/cli.py)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path


def stage_settings(p: argparse.ArgumentParser, *sections: str) -> None:
    """Show the settings a stage reads, with their docs, at the end of its --help (read from
    the source when --help asks: that takes ~1 s, which no other command should wait for)."""
    from echolm.settings import settings_help

    def format_help() -> str:
        p.epilog = settings_help(list(sections))
        return argparse.ArgumentParser.format_help(p)

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.format_help = format_help  # type: ignore[method-assign]


def number(kind: type, low: float, high: float = 2**53,
            above: bool = False) -> Callable[[str], int | float]:
    """An argparse `type=`: a finite int/float in [low, high] ((low, high] when `above`);
    anything else is argparse's one-line usage error (exit 2)."""
    wanted = (f"a {'whole' if kind is int else 'finite'} number {'>' if above else '>='} "
              f"{low:g}" + (f" and <= {high:g}" if high < 2**53 else ""))

    def parse(text: str) -> int | float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if not math.isfinite(v) or v < low or v > high or (above and v == low):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text}")
        return v
    return parse


SEED = number(int, 0, 2**63 - 1)


def run_args(p: argparse.ArgumentParser, out_required: bool = True,
              reconfigure: bool = True) -> None:
    p.add_argument("--out", "--run", dest="run", type=Path, required=out_required,
                   help="run directory (e.g. runs/demo)")
    p.add_argument("--preset", default=None,
                   help="preset name (micro, cpu, gpu-small, gpu-d20) or a TOML file; default: "
                        "the run's saved config, else cpu")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.FIELD=VALUE",
                   help="override any config field (repeatable; a stage's own fields are listed "
                        "below, every field with its doc by `echolm presets`)")
    p.add_argument("--force", action="store_true", help="redo the stage even if finished")
    if reconfigure:
        p.add_argument("--reconfigure", action="store_true",
                       help="let --preset/--set change the settings saved in DIR/config.json "
                            "(saved once the command succeeds; without it such a change is "
                            "refused, showing what would change)")
