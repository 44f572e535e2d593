"""The resume file (`<weights>.resume`): everything a killed run needs to go on as if never stopped.

It is read with `torch.load(weights_only=True)`, so it can only hold tensors and plain values
(numbers, strings, lists, dicts): a shared or planted file cannot run code when loaded. RNG
states are stored as tensors for that reason. Anything else is refused with one line.
"""
import random
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import numpy as np
import torch

from model.checkpoint import CheckpointError, load_torch_file

FORMAT = 2   # 1: the pickled format of earlier versions, refused (it could run code)


class ResumeError(ValueError):
    """A resume file that cannot be used; the message is one line saying why and what to do."""


@dataclass
class Progress:
    """Where training stands: the plain-value part of the resume file."""
    step: int = 0               # optimizer steps done
    epoch: int = 0              # the epoch in progress
    steps_in_epoch: int = 0     # its steps done (the sampler skips them on resume)
    history: List[dict] = field(default_factory=list)
    wandb_id: Optional[str] = None

    def advance(self, steps_per_epoch: int):
        self.step += 1
        self.steps_in_epoch += 1
        if self.steps_in_epoch == steps_per_epoch:
            self.epoch, self.steps_in_epoch = self.epoch + 1, 0

    @property
    def epoch_of_last_step(self) -> int:
        """The epoch (from 1) of the step done last: the one still in progress, or the one that
        step finished."""
        return self.epoch + (1 if self.steps_in_epoch else 0)

    def to_state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "Progress":
        return cls(**{k: state[k] for k in cls.__dataclass_fields__})


def load_resume_state(path: str) -> dict:
    try:
        state = load_torch_file(path, "resume file")
    except CheckpointError as e:   # not a torch file, damaged, or holding what could run code
        raise ResumeError(f"{e}; delete it to start fresh") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ResumeError(f"{path} is not a resume file of this version; delete it to start fresh")
    return state


def unfinished_step(path: str) -> Optional[int]:
    """The step held by `path`, the resume file of an earlier run, if that run had steps left;
    else None (finished, or not readable: --resume would say why). Memory-mapped: the weights
    and optimizer state are not read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        step, total = int(state["step"]), state.get("total_steps")
    except Exception:
        return None
    return step if total is None or step < total else None


def check_same_global_batch(state: dict, path: str, batch_size: int, world: int, accumulation: int):
    """Resuming continues the same sequence of optimizer steps, so the global batch (batch x
    processes x accumulation) must be the one the file was written with; how it is split may
    differ (a job preempted on 8 GPUs may come back on 4)."""
    saved = state["batch_size"] * state["world_size"] * state["accumulation_steps"]
    if batch_size * world * accumulation == saved:
        return
    how = (f"{path} was written with a global batch of {saved} (batch {state['batch_size']} x "
           f"{state['world_size']} process(es) x accumulation {state['accumulation_steps']}); this run has "
           f"{batch_size * world * accumulation}")
    per_process = saved // world if saved % world == 0 else None
    options = [f"--batch_size {b} --accumulation_steps {per_process // b}"
               for b in sorted({state["batch_size"], batch_size}, reverse=True)
               if per_process and per_process % b == 0]
    if options:
        raise ResumeError(f"{how}; with {world} process(es) resume with {' or '.join(options)}")
    raise ResumeError(f"{how}, which {world} process(es) cannot split evenly; resume on a number of "
                      f"processes that divides {saved}")


def check_same_data_order(state: dict, path: str, samples: int, seed: int):
    """The data order is drawn from the number of usable samples and the seed: with other data,
    or another --seed, the steps left would not be the ones the run had left (and with less data
    the run may already count as finished). Files of earlier versions do not record `samples`."""
    saved = state.get("samples")
    if saved is not None and saved != samples:
        raise ResumeError(f"{path} was written by a run over {saved} usable samples; this run has {samples}: "
                          f"resume with the same data, or start afresh without --resume")
    if state["seed"] != seed:
        raise ResumeError(f"{path} was written with --seed {state['seed']}, which orders the data; "
                          f"resume with --seed {state['seed']}")


def rng_state() -> dict:
    """This process's RNG states, as tensors and plain values."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
             "python": [py_version, torch.tensor(py_internal, dtype=torch.int64), py_gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    py_version, py_internal, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_internal.tolist()), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
