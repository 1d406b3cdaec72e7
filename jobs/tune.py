"""`python jobs/tune.py CONFIG.yaml [key.sub=value ...]` or `python jobs/tune.py --resume EXPERIMENT_DIR`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a bare checkout too

from rayrec.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
