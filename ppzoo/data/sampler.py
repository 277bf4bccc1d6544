"""Deterministic, resumable batches for data-parallel training with gradient accumulation.

The epoch stream is a permutation of all sample indices (numpy default_rng(seed + epoch), or the identity
without shuffling). Global step g covers stream positions [g*G, (g+1)*G) of its epoch, G the global batch
size; an epoch's last incomplete global batch is dropped, so steps never straddle epochs. Within a step,
micro step a of dp rank r takes the positions

    g*G + a*(micro*dp) + r*micro + [0, micro)

so the samples a step sees depend only on (seed, G, step), never on how the batch is split across ranks
and accumulation steps: a single-process run with the same global batch trains on the same samples.
Nothing is stateful, so resuming at step k is just asking for step k.
"""
import numpy as np

from ppzoo.errors import DataError


class DistributedBatchSampler:
    def __init__(
        self,
        num_samples,
        global_batch_size,
        micro_batch_size,
        accumulate_steps,
        dp_rank,
        dp_size,
        seed,
        shuffle=True,
    ):
        for label, value in (
            ("global_batch_size", global_batch_size),
            ("micro_batch_size", micro_batch_size),
            ("accumulate_steps", accumulate_steps),
            ("dp_size", dp_size),
        ):
            if int(value) < 1:
                raise ValueError(f"{label} must be at least 1, got {value}")
        if micro_batch_size * accumulate_steps * dp_size != global_batch_size:
            raise ValueError(
                f"global_batch_size ({global_batch_size}) must equal micro_batch_size ({micro_batch_size}) "
                f"x accumulate_steps ({accumulate_steps}) x dp_size ({dp_size}) = "
                f"{micro_batch_size * accumulate_steps * dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        if num_samples < global_batch_size:
            raise DataError(
                f"The dataset has {num_samples} samples, fewer than one global batch of {global_batch_size}. "
                f"Use more data, a shorter Data.seq_len, or a smaller Global.global_batch_size."
            )
        self.num_samples = int(num_samples)
        self.global_batch_size = int(global_batch_size)
        self.micro_batch_size = int(micro_batch_size)
        self.accumulate_steps = int(accumulate_steps)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self._cached_epoch, self._cached_order = None, None

    @property
    def steps_per_epoch(self):
        return self.num_samples // self.global_batch_size

    def epoch_of(self, step):
        return step // self.steps_per_epoch

    def _epoch_order(self, epoch):
        # Consecutive steps share an epoch, so keeping the last permutation avoids recomputing it each step.
        if self._cached_epoch != epoch:
            if self.shuffle:
                order = np.random.default_rng(self.seed + epoch).permutation(self.num_samples)
            else:
                order = np.arange(self.num_samples, dtype=np.int64)
            self._cached_epoch, self._cached_order = epoch, order
        return self._cached_order

    def indices_for_step(self, step):
        """This rank's sample indices for global step `step` (0-based, across epochs).

        Returns accumulate_steps lists, one per micro step, of micro_batch_size indices each.
        """
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        order = self._epoch_order(self.epoch_of(step))
        step_start = (step % self.steps_per_epoch) * self.global_batch_size
        micro, ranks_per_micro_step = self.micro_batch_size, self.micro_batch_size * self.dp_size
        batches = []
        for accumulate_index in range(self.accumulate_steps):
            start = step_start + accumulate_index * ranks_per_micro_step + self.dp_rank * micro
            batches.append([int(i) for i in order[start : start + micro]])
        return batches

    def iter_steps(self, start_step=0, num_steps=None):
        """Yield (step, indices_for_step(step)) from start_step on, for num_steps steps (None: forever)."""
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield step, self.indices_for_step(step)
            step += 1

    def __repr__(self):
        return (
            f"DistributedBatchSampler(num_samples={self.num_samples}, global={self.global_batch_size}, "
            f"micro={self.micro_batch_size}, accumulate={self.accumulate_steps}, "
            f"dp_rank={self.dp_rank}/{self.dp_size}, seed={self.seed}, shuffle={self.shuffle})"
        )


def collate(samples):
    """Stack a list of sample dicts into one dict of arrays with a leading batch dimension."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    return {key: np.stack([sample[key] for sample in samples]) for key in samples[0]}
