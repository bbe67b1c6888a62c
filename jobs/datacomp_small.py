"""Stage 1 at DataComp's small scale on Ray Train (see --help).

    ray job submit --working-dir . -- python jobs/datacomp_small.py --pool URI --reference REF --output URI
"""
import os
import sys

# the job runs from the uploaded working directory: make its raymimic importable
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raymimic.app.train_job import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("small", prog="datacomp_small.py"))
