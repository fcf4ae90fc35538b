"""Multi-device baselines of the latency benchmark: one device, full-precision sequence parallelism
(the "Voltage" family) and Megatron-style tensor parallelism. Each is a `Method`: `setup` turns the
full model into this rank's part, `forward` runs one inference on this rank."""
