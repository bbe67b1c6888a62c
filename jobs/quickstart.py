"""The whole raymimic flow on a toy pool, offline, on an embedded local Ray (no arguments needed).

    python jobs/quickstart.py                 # writes runs/quickstart/report.md
    python jobs/quickstart.py --help
"""
import sys

from raymimic.app.quickstart import main

if __name__ == "__main__":
    sys.exit(main())
