"""`imagegen worker` as a worker from before several LoRA adapters (contract version 1): the same program,
but its InitializeReply reports the version before `loras`. It stands for a pod someone else runs that
has not been upgraded yet (tests/integration/test_grpc_workers.py)."""

import sys

from server.cli import main
from workers.hosts import grpc_server
from workers.hosts.grpc_messages import REQUEST_FIELDS_SINCE

grpc_server.CONTRACT_VERSION = REQUEST_FIELDS_SINCE["loras"] - 1

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
