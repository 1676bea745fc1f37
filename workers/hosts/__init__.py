"""The ways to reach the worker contract: the mp worker program, the Ray actor and the gRPC worker, with the pipeline thread they share."""
