"""Keyed seeding: a draw's seed is a hash of what it is for (seed, epoch, index, ...), so any process, worker or
resumed run replays it exactly, whatever ran before."""
import numpy as np
import torch


def key_seed(*parts: int) -> int:
    """63-bit seed from non-negative ints, e.g. (seed, epoch, index); SeedSequence hashing: independent streams."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def keyed_generator(*parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(key_seed(*parts))
