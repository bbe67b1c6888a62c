"""Every ``--help`` is quick: building the parsers and their help imports neither torch, Ray nor open_clip."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "ray", "open_clip")
# generous bounds: the machine running the tests may be busy (CPU time does not grow with the load, wall time does);
# importing torch alone costs more CPU time than the bound
CPU_BOUND_S = 3.0
WALL_BOUND_S = 15.0
# runs the entry point with --help, then reports which heavy modules the parser and its help imported
PROBE = """
import json, runpy, sys
target, argv = sys.argv[1], sys.argv[2:]
sys.argv = [target, *argv]
try:
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        from raymimic.app.cli import main
        main(argv)
except SystemExit as done:
    code = done.code
else:
    code = 0
print(json.dumps({"code": code, "heavy": sorted(m for m in HEAVY if m in sys.modules)}), file=sys.stderr)
""".replace("HEAVY", repr(HEAVY))


def _subcommands() -> list[str]:
    from raymimic.app.cli import build_parser

    parser = build_parser()
    return list(parser._subparsers._group_actions[0].choices)


COMMANDS = [["--help"], *[[name, "--help"] for name in _subcommands()], *[[str(p.relative_to(ROOT)), "--help"]
                                                                            for p in sorted((ROOT / "jobs").glob("*.py"))]]


def test_every_subcommand_and_job_is_covered():
    assert {c[0] for c in COMMANDS} >= {"--help", "train", "score", "filter", "report", "quickstart", "simulate", "make-toy-pool",
                                        "jobs/datacomp_small.py", "jobs/quickstart.py", "jobs/simulation.py"}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_help_is_quick_and_imports_nothing_heavy(command):
    target = command[0] if command[0].endswith(".py") else "raymimic"
    argv = command[1:] if command[0].endswith(".py") else command
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, target, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report["code"] == 0 and "usage:" in done.stdout, done.stderr
    assert report["heavy"] == [], f"{' '.join(command)} imported {report['heavy']} to show its help"
    assert cpu < CPU_BOUND_S and seconds < WALL_BOUND_S, f"{' '.join(command)} took {cpu:.2f} s CPU, {seconds:.2f} s wall"


def test_the_plain_registries_name_what_the_library_implements():
    from raymimic import choices
    from raymimic.clip.layers import ALIASES
    from raymimic.mimic.weighting import WEIGHTINGS

    assert choices.WEIGHTINGS == tuple(WEIGHTINGS) and ALIASES is choices.MIMIC_LAYER_ALIASES
