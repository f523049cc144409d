"""Communication: the counting Communicator over torch.distributed and the collective algorithms."""

from polytrain.comm.communicator import DEFAULT_TIMEOUT_S, CommError, Communicator, CommStats

__all__ = ["Communicator", "CommStats", "CommError", "DEFAULT_TIMEOUT_S"]
