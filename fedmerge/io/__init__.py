"""Reading and writing tensors: state dicts, lazily read checkpoints, Hugging Face directories, and
the one atomic writer everything else uses."""

from fedmerge.io.atomic import atomic_path, check_output, staged_directory, write_text_atomic, writing
from fedmerge.io.state import load_state, load_verified, read_cache_entry, save_state, save_verified, write_cache_entry

__all__ = [
    "atomic_path", "check_output", "load_state", "load_verified", "read_cache_entry", "save_state", "save_verified",
    "staged_directory", "write_cache_entry", "write_text_atomic", "writing",
]
