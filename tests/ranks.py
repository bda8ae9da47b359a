"""Running a function on several gloo ranks (one thread each), each a fresh process set up like torchrun's."""
from advcl_dist.distributed import free_port
from advcl_dist.distributed import run_local_ranks as run_ranks

__all__ = ["free_port", "run_ranks"]
