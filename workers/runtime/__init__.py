"""What runs on the device under the worker contract: step batching, levers, LoRA, quantization, rank groups."""
