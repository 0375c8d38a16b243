"""mmser: speech emotion recognition with wav2vec 2.0 fine-tuning strategies and audio-text fusion."""

__version__ = "0.1.0"

__all__ = ["EmotionClassifier", "__version__"]


def __getattr__(name: str):
    """`mmser.EmotionClassifier` imported on first use, so `import mmser` stays light (no torch)."""
    if name == "EmotionClassifier":
        from mmser.inference import EmotionClassifier

        return EmotionClassifier
    raise AttributeError(f"module 'mmser' has no attribute {name!r}")
