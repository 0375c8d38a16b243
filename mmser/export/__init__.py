"""Export of saved mmser models to other runtimes (a room of its own: it depends on mmser.inference
and mmser.models, and nothing in them depends on it). `mmser.export.onnx`: ONNX for onnxruntime,
read back by the torch-free predictor `mmser.onnx`."""
