"""GPUs and who holds them: the inventory (NVML or simulated), the allocation decision (pure),
the allocator (holdings from signed labels, claims under a file lock), the event log, and the
device nodes' access rules."""
