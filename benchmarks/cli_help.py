"""Start-up benchmark: every ``--help`` of the command line against a bare Python start and an ``import torch``.

    python benchmarks/cli_help.py --repeats 5 --json cli_help.json

In one invocation, each in a fresh process, --repeats times interleaved:

- ``python -c pass`` (the interpreter's own start: the floor) and ``python -c "import torch"``
  (what a help that imported torch would pay at least);
- ``raymimic --help`` and every subcommand's ``--help`` (``python -m raymimic.app.cli``);
- ``python jobs/NAME.py --help`` for every job.

It prints the median wall time and the median CPU time (user + system of the child) of each,
and each one's ratio to the bare start, and writes them as JSON. CPU time is the figure to
compare on a shared machine: wall time grows with the load, CPU time does not.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands() -> dict[str, list[str]]:
    sys.path.insert(0, str(ROOT))
    from raymimic.app.cli import build_parser

    subcommands = list(build_parser()._subparsers._group_actions[0].choices)
    commands = {"python -c pass": ["-c", "pass"], "python -c 'import torch'": ["-c", "import torch"],
                "raymimic --help": ["-m", "raymimic.app.cli", "--help"]}
    commands.update({f"raymimic {name} --help": ["-m", "raymimic.app.cli", name, "--help"] for name in subcommands})
    jobs = [str(job.relative_to(ROOT)) for job in sorted((ROOT / "jobs").glob("*.py"))]
    commands.update({f"{job} --help": [job, "--help"] for job in jobs})
    return commands


def _run(args: list[str]) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command, interleaved (default: 3)")
    parser.add_argument("--json", help="write the results as JSON here")
    args = parser.parse_args()
    commands = _commands()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(args.repeats):
        for name, argv in commands.items():
            times[name].append(_run(argv))
    floor_wall = statistics.median(w for w, _ in times["python -c pass"])
    floor_cpu = statistics.median(c for _, c in times["python -c pass"])
    results = {}
    print(f"{'command':<44} {'wall s':>7} {'CPU s':>7} {'wall / bare':>11} {'CPU / bare':>10}")
    for name, runs in times.items():
        wall, cpu = statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)
        results[name] = {"wall_s": wall, "cpu_s": cpu, "wall_ratio_to_bare": wall / floor_wall, "cpu_ratio_to_bare": cpu / floor_cpu}
        print(f"{name:<44} {wall:>7.2f} {cpu:>7.2f} {wall / floor_wall:>11.2f} {cpu / floor_cpu:>10.2f}")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"repeats": args.repeats, "load_average_1min": os.getloadavg()[0], "commands": results}, f, indent=2)


if __name__ == "__main__":
    main()
