"""Workers own devices and diffusers pipelines. Nothing here knows about HTTP or executors."""

from workers.config import OmniDiffusionConfig
from workers.data import LoraWeight, OmniDiffusionRequest, RequestOutput

__all__ = ["LoraWeight", "OmniDiffusionConfig", "OmniDiffusionRequest", "RequestOutput", "WorkerWrapperBase"]


def __getattr__(name: str):
    # Imported on first use so that the server process, which only talks to workers, never loads torch.
    if name == "WorkerWrapperBase":
        from workers.worker import WorkerWrapperBase

        return WorkerWrapperBase
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
