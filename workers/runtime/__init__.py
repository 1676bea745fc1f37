"""What runs on the device under the worker contract: stage timing, step batching and its denoise loops, the speed levers, LoRA adapters, rank groups."""
