"""The ways to reach the worker contract: the mp worker program, the Ray actor, the gRPC worker."""
