"""Rank groups, piece by piece: the topology arithmetic, the start-up refusals, and the CFG hooks and
the group's agreement over a real gloo process group of two processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from helpers import ROOT, free_port
from pydantic import ValidationError

from workers.config import OmniDiffusionConfig
from workers.runtime.rank_group import check_cfg_parallel
from workers.worker import WorkerWrapperBase


def test_num_gpus_must_be_groups_times_the_group_size_and_the_error_shows_the_arithmetic():
    config = OmniDiffusionConfig(num_gpus=8, cfg_parallel_size=2, ulysses_degree=2)
    assert (config.rank_group_size, config.num_rank_groups) == (4, 2)
    assert list(config.rank_group_of(6)) == [4, 5, 6, 7]
    with pytest.raises(ValidationError) as raised:
        OmniDiffusionConfig(num_gpus=6, cfg_parallel_size=2, ulysses_degree=2)
    message = str(raised.value)
    assert "groups x cfg_parallel_size (2) x ulysses_degree (2) x ring_degree (1) = groups x 4" in message
    assert "6 is not a multiple of 4" in message


def test_cfg_parallel_is_refused_for_pipelines_without_a_doubled_batch():
    check_cfg_parallel("StableDiffusionXLPipeline")
    with pytest.raises(ValueError, match="guidance-distilled"):
        check_cfg_parallel("FluxPipeline")
    with pytest.raises(ValueError, match="does not run classifier-free guidance as one doubled batch"):
        check_cfg_parallel("WanPipeline")


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"model": "tiny-flux", "cfg_parallel_size": 2}, "guidance-distilled"),
        ({"model": "tiny", "cfg_parallel_size": 2, "compile": "full"}, "use --compile regional"),
        ({"model": "tiny-sd3", "cfg_parallel_size": 2, "cache_method": "faster"}, "use pab"),
        ({"model": "tiny-flux", "ulysses_degree": 2}, "needs an accelerator"),
        ({"model": "tiny", "cfg_parallel_size": 2}, "need --rank-group-address"),
    ],
)
def test_a_worker_refuses_a_rank_group_it_cannot_run_before_it_meets_its_peers(settings, message):
    # Each refusal comes before the rendezvous, so one process shows it without any peer.
    worker = WorkerWrapperBase(0, OmniDiffusionConfig(device="cpu", num_gpus=2, **settings))
    with pytest.raises(ValueError, match=message):
        worker.initialize()


# Runs in each of two processes: rank 0 and rank 1 of one CFG pair, over gloo on this host.
PAIR_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from workers.config import OmniDiffusionConfig
    from workers.runtime.rank_group import CfgParallelHooks, RankGroup

    rank, address = int(sys.argv[1]), sys.argv[2]
    config = OmniDiffusionConfig(num_gpus=2, cfg_parallel_size=2, rank_group_address=address,
                                 worker_start_timeout_s=60, rpc_timeout_s=60)
    group = RankGroup.join(rank, config, torch.device("cpu"))
    torch.manual_seed(0)
    denoiser = torch.nn.Linear(4, 3)

    class Denoiser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = denoiser

        def forward(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True):
            out = self.inner(sample) + encoder_hidden_states + added_cond_kwargs["text_embeds"] + timestep
            return (out,)

    module = Denoiser()
    seen = []
    hooks = CfgParallelHooks(module, group)
    module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0].shape[0]), with_kwargs=True)
    hooks.images_in_call = 3
    torch.manual_seed(1)
    sample, text, pooled = torch.randn(6, 4), torch.randn(6, 3), torch.randn(6, 3)
    split = module(sample, torch.tensor(2.0), encoder_hidden_states=text, added_cond_kwargs={"text_embeds": pooled})[0]
    whole = denoiser(sample) + text + pooled + 2.0
    hooks.images_in_call = 6  # a batch that is not doubled runs whole
    unsplit = module(sample, torch.tensor(2.0), encoder_hidden_states=text, added_cond_kwargs={"text_embeds": pooled})[0]
    agreed = [group.any(rank == 1), group.any(False)]
    print(json.dumps({
        "seen": seen, "max_diff": float((split - whole).abs().max()), "unsplit_diff": float((unsplit - whole).abs().max()),
        "agreed": agreed, "cfg_rank": group.cfg_rank,
    }))
    group.leave()
    """
)


def test_a_cfg_pair_runs_half_the_batch_each_gathers_the_whole_and_agrees_on_a_flag():
    address = f"127.0.0.1:{free_port()}"
    pair = [
        subprocess.Popen(
            [sys.executable, "-c", PAIR_SCRIPT, str(rank), address], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        for rank in (0, 1)
    ]
    results = []
    for process in pair:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0
        results.append(json.loads(out.strip().splitlines()[-1]))
    for rank, result in enumerate(results):
        assert result["cfg_rank"] == rank
        assert result["seen"] == [3, 6]  # half of the doubled batch, then the whole undoubled one
        assert result["max_diff"] < 1e-5 and result["unsplit_diff"] == 0
        assert result["agreed"] == [True, False]  # rank 1's flag reached rank 0
