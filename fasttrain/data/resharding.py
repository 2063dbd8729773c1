"""A loader's saved position carried to another number of processes: the state each rank of the new world
continues from, so the stream goes on with the rows the saved world had not read.

Imports from fasttrain: system.errors.
"""

from __future__ import annotations

from fasttrain.system.errors import UsageError


def reshard(saved: list[dict], rank: int, world_size: int, rounds: int | None = None) -> dict:
    """The state for `rank` of `world_size` that continues the stream where `saved` (every rank's state_dict, from a
    world of len(saved) ranks at the same batch count) stopped. After b batches per rank, (e, i) = divmod(b, per-rank
    batches per epoch), a world of W has consumed global batches 0 .. i * W - 1 of epoch e; a world of M continues at i
    * W / M batches per rank (UsageError if not whole). A mixture's blend state is the world's: each source's position
    (e, i) of the saved world's epochs becomes (e, i) of this world's (epoch e + 1's start if i falls in the tail it
    drops). `rounds`: the batch count to go on from, the run's step times this world's accumulation (None: the saved
    count). The tokens read carry over."""
    state = dict(saved[0])
    counts = {s["batches"] for s in saved}
    if len(counts) != 1:
        raise UsageError(f"the saved ranks stopped at different loader positions ({sorted(counts)} batches)")
    num_rows = state["num_rows"] if isinstance(state["num_rows"], list) else [state["num_rows"]]  # pre-mixture
    rows_per_batch = state["batch_size"]
    if len(num_rows) > 1:
        positions = [
            _renumbered(p, n, rows_per_batch, len(saved), world_size) for p, n in zip(state["positions"], num_rows)
        ]
        batches = state["batches"] if rounds is None else rounds
        if "mix_rounds" in state and state["batches"]:  # step x the saved accumulation -> step x this world's
            state["mix_rounds"] = [r * batches // state["batches"] for r in state["mix_rounds"]]
        return {**state, "batches": batches, "rank": rank, "world_size": world_size, "positions": positions}
    if len(saved) == world_size:
        return {**state, "rank": rank, "world_size": world_size}
    epoch, i = divmod(state["batches"], num_rows[0] // (rows_per_batch * len(saved)))
    done = i * len(saved)  # global batches of this epoch consumed
    per_rank = num_rows[0] // (rows_per_batch * world_size)
    if done >= per_rank * world_size:  # in the tail this world drops: its next epoch comes next
        epoch, done = epoch + 1, 0
    if done % world_size:
        raise UsageError(
            f"the run stopped after {done} batches of {rows_per_batch} rows into epoch {epoch}, which "
            f"{world_size} processes cannot split evenly (each takes one batch in {world_size}); resume "
            f"with a number of processes that divides {done}, or with the {len(saved)} it was saved with"
        )
    batches = epoch * per_rank + done // world_size
    # the one source's position in rows, in this world's epochs (its deficit is always 0)
    position = epoch * per_rank * world_size * rows_per_batch + done * rows_per_batch
    return {
        **state,
        "batches": batches,
        "rank": rank,
        "world_size": world_size,
        "num_rows": num_rows,
        "positions": [position],
        "deficits": [0.0],
    }


def _renumbered(position: int, num_rows: int, batch_size: int, saved_world: int, world_size: int) -> int:
    """A source's `position` counted in the epochs of a world of `saved_world` ranks, counted in those of
    `world_size` ranks: the same row of the same epoch, or the next epoch's first if this world drops it."""
    saved_epoch, epoch = (num_rows // (batch_size * w) * batch_size * w for w in (saved_world, world_size))
    passed, index = divmod(position, saved_epoch)
    return passed * epoch + min(index, epoch)
