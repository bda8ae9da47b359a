"""`multiview_nt_xent(gather=True)` over 2 gloo processes == the loss on the concatenated batch."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from advcl_dist.distributed import free_port
from advcl_dist.losses import multiview_nt_xent

pytestmark = pytest.mark.distributed

B, V, D, WORLD = 3, 4, 8, 2


def full_batch():
    torch.manual_seed(0)
    return torch.randn(WORLD * B, V, D, dtype=torch.float64)


def worker(rank, port, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        z = full_batch()[rank * B:(rank + 1) * B].clone().requires_grad_(True)
        loss = multiview_nt_xent(z, temperature=0.5, gather=True)
        loss.backward()
        results[rank] = (loss.detach(), z.grad)
    finally:
        dist.destroy_process_group()


def test_gathered_loss_and_gradients_equal_the_single_process_loss():
    results = mp.Manager().dict()
    mp.spawn(worker, args=(free_port(), results), nprocs=WORLD, join=True)

    z = full_batch().requires_grad_(True)
    expected = multiview_nt_xent(z, temperature=0.5)
    expected.backward()
    mean_loss = sum(results[r][0] for r in range(WORLD)) / WORLD
    assert torch.allclose(mean_loss, expected.detach(), atol=1e-12)
    # Each rank's gradient of its own loss, summed over ranks by the gather's backward, is WORLD × the
    # gradient of the mean loss; DDP's averaging over ranks divides it back.
    grads = torch.cat([results[r][1] for r in range(WORLD)]) / WORLD
    assert torch.allclose(grads, z.grad, atol=1e-12), (grads - z.grad).abs().amax(dim=(1, 2))
