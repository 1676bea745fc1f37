"""`imagegen worker` with a test hook: while the FIFO named by IMAGEGEN_TEST_HANG_FIFO exists, every
pipeline call blocks on reading it until the test closes its end, and the worker's gRPC threads (health,
cancel) keep answering. It stands for a pipeline stuck on its device
(tests/fault/test_rank_group_set_aside.py, whose HangableWorker holds the FIFO's other end)."""

import os
import sys

from server.cli import main
from workers.worker import WorkerWrapperBase

_generate = WorkerWrapperBase.generate


def _generate_unless_hung(self, requests, *args, **kwargs):
    try:
        # The test holds a writer open while the FIFO exists, so this open returns at once.
        fifo = os.open(os.environ["IMAGEGEN_TEST_HANG_FIFO"], os.O_RDONLY)
    except FileNotFoundError:
        return _generate(self, requests, *args, **kwargs)  # not hung
    try:
        os.read(fifo, 1)  # the hang itself: returns when the test closes its end
    finally:
        os.close(fifo)
    return _generate(self, requests, *args, **kwargs)


WorkerWrapperBase.generate = _generate_unless_hung

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
