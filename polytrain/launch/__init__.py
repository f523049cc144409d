"""Launching ranks: local worker processes, the torchrun environment, the emulated multi-host cluster."""

from polytrain.launch.local import (WorkerFailed, init_from_torchrun, run_on_every_world_size, run_on_subworlds,
                                    run_workers, under_torchrun)

__all__ = ["run_workers", "run_on_subworlds", "run_on_every_world_size", "WorkerFailed", "init_from_torchrun", "under_torchrun"]
