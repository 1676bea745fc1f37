"""`imagegen worker` as a worker of the contract's previous version answers: the same program, but its
InitializeReply reports CONTRACT_VERSION - 1. It stands for a pod someone else runs that has not been
upgraded yet (tests/integration/test_grpc_workers.py)."""

import sys

from server.cli import main
from workers.hosts import grpc_server

grpc_server.CONTRACT_VERSION -= 1

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
