"""--reduce: who adds up the workers' gradient slots, and who applies the update.

    parent   the trainer adds every slot, then updates (the default).
    workers  after a barrier, worker k adds slice k of every slot into the `reduced` segment (a
             reduce-scatter in shared memory); the trainer updates from that sum.
    sharded  the same, and worker k applies the update to its slice too: two weight buffers (the
             step reads one, the workers write the other) and the optimizer's state shared.

Every mode adds in the same order, so all three give the same bits. What a mode needs is said
here once, by what it means; the pool and the workers ask this, never the mode's name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReduceMode:
    name: str
    workers_add: bool  # the workers add up the slots, each its slice: a barrier, the mailbox, every worker takes part
    workers_update: bool  # ... and apply the update to their slice

    @property
    def buffers(self) -> int:
        """Weights buffers (and optimizer state buffers): a second one for the workers to write."""
        return 2 if self.workers_update else 1

    @property
    def reduced(self) -> bool:
        """The workers' sum goes to a segment of its own, for the trainer's update."""
        return self.workers_add and not self.workers_update


MODES = {mode.name: mode for mode in (ReduceMode("parent", False, False), ReduceMode("workers", True, False),
                                      ReduceMode("sharded", True, True))}
