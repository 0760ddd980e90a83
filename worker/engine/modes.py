"""The names of the engine's two switches, in one place and without torch, so that the
command line (whose `provision` and `check-config` never load torch) can offer them.

- A runner mode says how a step reaches the device: `eager` hands over the tensors as
  built; `pipelined` stages them in one pinned copy, replays CUDA graphs for decode steps
  and overlaps a step's launch with the previous step's readback (CUDA's default).
- A policy says how sequences are batched. The product is `continuous`; the others are
  the benchmark ladder's older rungs (`worker.engine.ladder`), kept to measure what each
  decision buys on the same code.
"""

RUNNER_MODES: tuple[str, ...] = ("eager", "pipelined")
POLICIES: tuple[str, ...] = ("serial", "window", "budget", "lanes", "continuous")
