"""App-agnostic core: GRS, reshaped rewards, dedup, schedules, split sampler, losses, round loop, inversion."""
