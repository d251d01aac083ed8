"""difflower.runtimes: engines per backend, plugged into the one denoising loop."""
