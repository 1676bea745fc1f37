"""Rank groups: the ranks that make each image together (a CFG pair, a context-parallel group, or both).

Each group is its own torch.distributed world among its own ranks (gloo on CPU, NCCL on CUDA): the
engine is not a member, and no two groups share a process group, so one group's failure cannot
touch another's. Rank ``r`` is rank ``r % size`` of group ``r // size``; the group's first rank is
its leader, whose replies, partial images and progress are the group's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from workers.config import OmniDiffusionConfig

logger = logging.getLogger(__name__)

# The pipelines that run classifier-free guidance as one denoiser call on a doubled batch
# ([unconditional, conditional] along the batch), which is what CFG-parallel splits.
CFG_PARALLEL_PIPELINES = frozenset({
    "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
    "StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline",
    "PixArtAlphaPipeline", "PixArtSigmaPipeline", "SanaPipeline",
})


class RankGroupError(RuntimeError):
    """A collective of the rank group failed: a peer is gone or hung, and the group must be formed anew."""


def check_cfg_parallel(pipeline_name: str) -> None:
    """ValueError, in one line, unless ``pipeline_name`` runs its guidance as a doubled batch."""
    if pipeline_name in CFG_PARALLEL_PIPELINES:
        return
    if pipeline_name.startswith("Flux"):
        raise ValueError(
            f"--cfg-parallel-size 2: {pipeline_name} has no unconditional pass to give a second rank (FLUX.1-dev and "
            "schnell are guidance-distilled: guidance is an input of the transformer)"
        )
    raise ValueError(
        f"--cfg-parallel-size 2: {pipeline_name} does not run classifier-free guidance as one doubled batch; "
        f"pipelines that do: {', '.join(sorted(CFG_PARALLEL_PIPELINES))}"
    )


def check_context_parallel(od_config: OmniDiffusionConfig, device: torch.device) -> None:
    """ValueError, in one line, where diffusers' context parallelism cannot run."""
    if device.type != "cuda":
        raise ValueError(
            f"--ulysses-degree {od_config.ulysses_degree} / --ring-degree {od_config.ring_degree}: diffusers' context "
            f"parallelism needs an accelerator (it places rank r on device r % torch.accelerator.device_count(), "
            f"which is 0 on {device.type}); use --cfg-parallel-size or data parallel here"
        )


@dataclass
class RankGroup:
    """This rank's place in its group and the group's collectives.

    ``cfg_rank`` is 0 for the rank that runs the unconditional half of a CFG pair, 1 for the
    conditional one. ``process_group`` holds the whole group, ``cfg_group`` the pair (the whole
    group too without context parallelism); both time out after ``rpc_timeout_s``, so a survivor
    waits for a hung peer no longer than the engine does.
    """

    index: int
    size: int
    rank_in_group: int
    cfg_size: int
    cfg_rank: int
    device: torch.device
    process_group: Any = None
    cfg_group: Any = None
    mesh: Any = None  # the ("cfg", "ring", "ulysses") device mesh, with context parallelism
    _flag: torch.Tensor = field(init=False, repr=False)

    @property
    def is_leader(self) -> bool:
        return self.rank_in_group == 0

    @classmethod
    def join(cls, rank: int, od_config: OmniDiffusionConfig, device: torch.device) -> RankGroup | None:
        """Form (or join) ``rank``'s group at ``rank_group_address``; None where groups are one rank."""
        size = od_config.rank_group_size
        if size == 1:
            return None
        if od_config.rank_group_address is None:
            raise ValueError(
                f"rank groups of {size} ranks need --rank-group-address host:port (the leader's, {{leader}} standing "
                "for its rank) on every worker"
            )
        ranks = od_config.rank_group_of(rank)
        address = od_config.rank_group_address.replace("{leader}", str(ranks[0]))
        # One GPU per rank takes NCCL; ranks that share a device (or the CPU) take gloo.
        backend = "nccl" if device.type == "cuda" and torch.cuda.device_count() >= size else "gloo"
        logger.info(
            "rank %d joins rank group %d (%d ranks, %s) at %s", rank, rank // size, size, backend, address
        )
        dist.init_process_group(
            backend,
            init_method=f"tcp://{address}",
            rank=rank % size,
            world_size=size,
            # Waiting for the peers to start counts as start-up; a step's collective is one RPC.
            timeout=timedelta(seconds=od_config.worker_start_timeout_s),
        )
        cfg_size = od_config.cfg_parallel_size
        group = cls(
            index=rank // size,
            size=size,
            rank_in_group=rank % size,
            cfg_size=cfg_size,
            # Ranks are laid out (cfg, ring, ulysses): the CFG half is the slowest-moving index.
            cfg_rank=(rank % size) // (size // cfg_size),
            device=device,
            process_group=dist.new_group(list(range(size)), timeout=timedelta(seconds=od_config.rpc_timeout_s)),
        )
        group.cfg_group = group.process_group
        if size > cfg_size:
            from torch.distributed.device_mesh import init_device_mesh

            group.mesh = init_device_mesh(
                device.type,
                (cfg_size, od_config.ring_degree, od_config.ulysses_degree),
                mesh_dim_names=("cfg", "ring", "ulysses"),
            )
            group.cfg_group = group.mesh["cfg"].get_group()
        return group

    def __post_init__(self) -> None:
        on_device = self.device.type == "cuda" and dist.get_backend(self.process_group) == "nccl"
        self._flag = torch.zeros(1, dtype=torch.int32, device=self.device if on_device else "cpu")

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any: how the group agrees at a step's end."""
        self._flag.fill_(int(flag))
        self._collective(dist.all_reduce, self._flag, op=dist.ReduceOp.MAX, group=self.process_group)
        return bool(self._flag.item())

    def gather_cfg_halves(self, half: torch.Tensor) -> torch.Tensor:
        """This rank's half of a doubled batch -> the whole batch, [unconditional, conditional], on every rank."""
        local = half.contiguous()
        on_wire = local if dist.get_backend(self.cfg_group) == "nccl" else local.cpu()
        halves = [torch.empty_like(on_wire) for _ in range(self.cfg_size)]
        self._collective(dist.all_gather, halves, on_wire, group=self.cfg_group)
        return torch.cat([h.to(local.device) for h in halves])

    def _collective(self, operation, *args, **kwargs) -> None:
        try:
            operation(*args, **kwargs)
        except RuntimeError as error:  # gloo's and NCCL's errors (DistBackendError and the like) are RuntimeErrors
            raise RankGroupError(f"rank group {self.index}: a peer is gone or hung ({error})") from error

    def leave(self) -> None:
        """Leave the process group, so that a new one can be formed."""
        if dist.is_initialized():
            dist.destroy_process_group()


class CfgParallelHooks:
    """Splits each doubled-batch denoiser call between the two ranks of a CFG pair.

    A forward pre-hook keeps this rank's half of every batched input (the latents, the text
    embeddings, SDXL's added conditions, a per-sample timestep); a forward hook gathers both
    halves of the noise prediction. They are torch hooks around the module's whole call, so the
    step caches (which swap ``forward``) and regional compile (inside the blocks) run within them.
    A call whose batch is not doubled (guidance off, SD3's skip-layer pass) runs whole on both ranks.
    """

    def __init__(self, denoiser: torch.nn.Module, group: RankGroup):
        self.group = group
        # Images in the pipeline call now; the worker sets it, and a doubled batch holds twice as many.
        self.images_in_call = 0
        self._split = False
        denoiser.register_forward_pre_hook(self._keep_own_half, with_kwargs=True)
        denoiser.register_forward_hook(self._gather_halves, with_kwargs=True)

    def _keep_own_half(self, module, args: tuple, kwargs: dict):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        doubled = 2 * self.images_in_call
        self._split = isinstance(sample, torch.Tensor) and self.images_in_call > 0 and sample.shape[0] == doubled
        if not self._split:
            return None
        half = slice(self.group.cfg_rank * self.images_in_call, (self.group.cfg_rank + 1) * self.images_in_call)
        return _take(args, doubled, half), _take(kwargs, doubled, half)

    def _gather_halves(self, module, args: tuple, kwargs: dict, output):
        if not self._split:
            return None
        self._split = False
        if isinstance(output, tuple):
            return (self.group.gather_cfg_halves(output[0]), *output[1:])
        output.sample = self.group.gather_cfg_halves(output.sample)
        return output


def _take(value, batch: int, half: slice):
    """``value`` with every tensor whose first dimension is ``batch`` cut to ``half`` (in tuples, lists and dicts too)."""
    if isinstance(value, torch.Tensor):
        return value[half] if value.ndim and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {key: _take(item, batch, half) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_take(item, batch, half) for item in value)
    return value


def form_rank_group(
    pipeline, config: OmniDiffusionConfig, rank: int, device: torch.device
) -> tuple[RankGroup | None, CfgParallelHooks | None]:
    """Check that ``pipeline`` takes this rank group's kinds of parallelism, then form the group with
    the rank's peers and put the parallelism on the denoiser (before the levers, which wrap it). Returns
    the group and the hooks that give the rank its half of each CFG call (None, None: one rank per image)."""
    if config.rank_group_size == 1:
        return None, None
    if config.cfg_parallel_size > 1:
        check_cfg_parallel(type(pipeline).__name__)
        if config.compile == "full":
            raise ValueError(
                "--cfg-parallel-size 2 with --compile full would trace the pair's collective into the graph; "
                "use --compile regional (the repeated blocks only)"
            )
        if config.cache_method == "faster":
            raise ValueError(
                "--cache-method faster splits the doubled CFG batch itself, which --cfg-parallel-size 2 has "
                "already split over the pair; use pab, or one rank per image"
            )
    context_parallel = config.ulysses_degree * config.ring_degree > 1
    if context_parallel and getattr(pipeline, "transformer", None) is None:
        raise ValueError(
            f"--ulysses-degree / --ring-degree split a DiT transformer's sequence; {type(pipeline).__name__} has none"
        )
    group = RankGroup.join(rank, config, device)
    if context_parallel:
        from diffusers import ContextParallelConfig

        pipeline.transformer.enable_parallelism(
            config=ContextParallelConfig(
                ring_degree=config.ring_degree, ulysses_degree=config.ulysses_degree, mesh=group.mesh
            )
        )
    hooks = None
    if config.cfg_parallel_size > 1:
        hooks = CfgParallelHooks(getattr(pipeline, "transformer", None) or pipeline.unet, group)
    return group, hooks
