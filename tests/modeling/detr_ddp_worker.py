"""Worker of ``test_detr_loss.py``'s two-process test (run by ``torchrun --standalone --nproc_per_node 2``).

Each rank trains on its half of the global batch in ``payload.pt`` with ``DistributedDataParallel`` (gloo, CPU) and
rank 0 writes the rank-averaged losses and the (DDP-averaged) gradients to ``result.pt``.
Usage: ``detr_ddp_worker.py PAYLOAD RESULT``.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hf_vl import HfVlDetrConfig, HfVlDetrForObjectDetection


def run_case(case: dict, payload: dict, rank: int, world: int) -> dict:
    model = HfVlDetrForObjectDetection(HfVlDetrConfig(**case["config"])).train()
    model.load_state_dict(payload["state"])
    ddp = DistributedDataParallel(model)
    per_rank = len(case["labels"]) // world
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    inputs = {key: value[part] for key, value in payload["inputs"].items()}
    out = ddp(**inputs, labels=case["labels"][part])
    out.loss.backward()
    # the loss each rank optimises is local; its mean over ranks is what DDP's averaged gradient descends
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    logs = {}
    for key, value in out.loss_dict.items():
        value = value.clone().float()
        dist.all_reduce(value)
        logs[key] = value / world
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss / world, "logs": logs, "grads": grads}


def main(payload_path: str, result_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    payload = torch.load(payload_path, weights_only=False)
    results = {"world_size": world, "cases": {}}
    for name, case in payload["cases"].items():
        results["cases"][name] = run_case(case, payload, rank, world)
    if rank == 0:
        torch.save(results, result_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
