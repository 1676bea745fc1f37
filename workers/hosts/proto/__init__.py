"""The worker contract as protobuf messages (worker.proto) and the code grpcio-tools generates from it.

The generated files are committed, made by the grpcio-tools version pinned in pyproject.toml;
`make proto` regenerates them, and tests/unit/test_grpc_messages.py fails when they are stale.
"""
