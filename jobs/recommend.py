"""`python jobs/recommend.py RUN_OR_CHECKPOINT [key.sub=value ...]` (or CONFIG.yaml with infer.checkpoint=...);
also under `ray job submit --working-dir . --`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a bare checkout too

from rayrec.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["recommend", *sys.argv[1:]]))
