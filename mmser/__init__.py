"""mmser: speech emotion recognition with wav2vec 2.0 fine-tuning strategies and audio-text fusion."""

__version__ = "0.1.0"
