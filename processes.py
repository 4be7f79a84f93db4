"""Sharing sampling work between the processes of `accelerate launch` (evaluate.py, filter_data.py).

    accelerate launch --num_processes 2 evaluate.py --model M --data D          # one GPU per process
    accelerate launch --multi_gpu --num_processes 2 filter_data.py ...           # also on CPU (gloo)

Both scripts cut their work into fixed, seeded chunks, so a chunk's samples do not depend on which
process draws them. The processes take the chunks in rounds (chunk i of a round goes to process i),
the main process gathers each round's results in chunk order and is the only one that reads and writes
files. The output is the same as one process would write. Without a launcher (one process) nothing
here touches torch.distributed.
"""

import os


_state = None


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state():
    """accelerate's `PartialState` under a launcher with several processes (gloo on CPU), else None."""
    global _state
    if _state is None and _distributed():
        import torch
        from accelerate import PartialState

        _state = PartialState(cpu=not torch.cuda.is_available())
    return _state


def process_index() -> int:
    state = process_state()
    return state.process_index if state is not None else 0


def num_processes() -> int:
    state = process_state()
    return state.num_processes if state is not None else 1


def is_main_process() -> bool:
    return process_index() == 0


def share_from_main(compute):
    """`compute()` run by the main process, its result handed to every process."""
    if num_processes() == 1:
        return compute()
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([compute() if is_main_process() else None], from_process=0)[0]


def shared_map(items: list, work):
    """`work(item)` for every item, the processes taking the items in rounds; yields every result, in item
    order, on the main process (None on the others). Every process must call it with the same items."""
    count, index = num_processes(), process_index()
    if count == 1:
        for item in items:
            yield work(item)
        return
    from accelerate.utils import gather_object

    for start in range(0, len(items), count):
        batch = items[start : start + count]
        result = work(batch[index]) if index < len(batch) else None
        results = gather_object([result])
        for result in results[: len(batch)]:
            yield result if index == 0 else None


def release():
    """Tear the process group down before exiting (gloo can abort at interpreter exit otherwise)."""
    global _state
    if _state is not None:
        _state.destroy_process_group()
        _state = None
