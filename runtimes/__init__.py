"""difflower.runtimes: engines per backend, plugged into the one denoising loop."""

# Engine names; each is `difflower.runtimes.<name>_engine` with a module attribute ENGINE. Kept
# here, away from torch, so the command line can list them without importing it.
ENGINES: tuple[str, ...] = ("onnxruntime", "torch", "openvino", "torchscript", "neuron", "tensorrt", "coreml", "aoti")
