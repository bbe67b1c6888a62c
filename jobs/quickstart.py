"""The whole raymimic flow on a toy pool, offline, on an embedded local Ray (no arguments needed).

    python jobs/quickstart.py                 # writes runs/quickstart/report.md
    python jobs/quickstart.py --help
"""
import os
import sys

# the job runs from the uploaded working directory: make its raymimic importable
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raymimic.app.quickstart import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
