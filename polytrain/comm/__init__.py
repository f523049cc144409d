"""Communication: the counting Communicator over torch.distributed and the collective algorithms."""

from polytrain.comm.communicator import BOOKKEEPING, DEFAULT_TIMEOUT_S, CommError, Communicator, CommStats

__all__ = ["BOOKKEEPING", "Communicator", "CommStats", "CommError", "DEFAULT_TIMEOUT_S"]
