"""Weight formats in and out: HF safetensors, GGUF, dummy random weights, Orbax store."""
from checkpoints.errors import CheckpointError
from checkpoints.loader import LOAD_FORMATS, Checkpoint, load_checkpoint, load_config, load_tokenizer, resolve

__all__ = ["CheckpointError", "Checkpoint", "LOAD_FORMATS", "load_checkpoint", "load_config", "load_tokenizer", "resolve"]
