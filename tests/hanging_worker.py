"""`imagegen worker` with a test hook: while the file named by IMAGEGEN_TEST_HANG_FILE exists, every
pipeline call waits for it to go, and the worker's gRPC threads (health, cancel) keep answering. It stands
for a pipeline stuck on its device (tests/fault/test_rank_group_set_aside.py)."""

import os
import sys
import time
from pathlib import Path

from server.cli import main
from workers.worker import WorkerWrapperBase

_generate = WorkerWrapperBase.generate


def _generate_unless_hung(self, requests):
    hang = Path(os.environ["IMAGEGEN_TEST_HANG_FILE"])
    while hang.exists():  # the hang itself, inside the worker: the test removes the file to end it
        time.sleep(0.05)
    return _generate(self, requests)


WorkerWrapperBase.generate = _generate_unless_hung

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
