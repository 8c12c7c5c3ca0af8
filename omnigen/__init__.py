"""omnigen: compile a spec for an omni-modal HuggingFace model into a readable torchrun training script."""

__version__ = "0.1.0"
