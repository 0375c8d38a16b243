"""mmser: speech emotion recognition with wav2vec 2.0 fine-tuning strategies and audio-text fusion."""

import os

# cuBLAS reads its workspace setting once, when the process creates its first handle: it must be in
# the environment before any mmser code touches CUDA. Lightning's Trainer(deterministic=True) sets it
# only when the Trainer is built, after a model may already have run a matmul on the GPU (P-TAPT's
# k-means runs before step (c)'s Trainer), and torch's deterministic mode then refuses cuBLAS calls
# or they run with the default, non-reproducible workspace. ":4096:8" is Lightning's (and NVIDIA's)
# reproducible value; a value already set by the user is kept.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

__version__ = "0.1.0"

__all__ = ["EmotionClassifier", "__version__"]


def __getattr__(name: str):
    """`mmser.EmotionClassifier` imported on first use, so `import mmser` stays light (no torch)."""
    if name == "EmotionClassifier":
        from mmser.inference import EmotionClassifier

        return EmotionClassifier
    raise AttributeError(f"module 'mmser' has no attribute {name!r}")
