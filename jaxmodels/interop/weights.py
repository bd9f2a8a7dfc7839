"""safetensors files of a Hugging Face checkpoint folder, read and written without torch.

A folder holds one `model.safetensors`, or shards listed by `model.safetensors.index.json`
({"weight_map": {tensor name: shard file}}). Tensors are read one at a time, as JAX arrays, through
safetensors' "flax" framework: its "numpy" one cannot read bfloat16 (NumPy has no such dtype, and
`safetensors.numpy.save_file` writes `ml_dtypes.bfloat16` arrays with a wrong header), and most
published checkpoints are bfloat16.
"""

import contextlib
import json
import pathlib

import jax
from safetensors import safe_open
from safetensors.flax import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsFolder:
    """The tensors of a checkpoint folder: `names`, `shape(name)` (from the header, nothing loaded) and
    `load(name)` (a JAX array in the file's dtype). Use as a context manager: the shards stay open inside it.

    Raises FileNotFoundError naming the folder when it has neither model.safetensors nor the index.
    """

    def __init__(self, directory):
        self.directory = pathlib.Path(directory)
        index = self.directory / INDEX_FILE
        if index.exists():
            self._file_of = {name: self.directory / file
                             for name, file in json.loads(index.read_text())["weight_map"].items()}
        elif (self.directory / SINGLE_FILE).exists():
            with safe_open(self.directory / SINGLE_FILE, "flax") as f:
                self._file_of = dict.fromkeys(f.keys(), self.directory / SINGLE_FILE)
        else:
            raise FileNotFoundError(f"{self.directory} holds no {SINGLE_FILE} and no {INDEX_FILE}: not a "
                                    "safetensors checkpoint (Hugging Face's save_pretrained(..., "
                                    "safe_serialization=True) writes one)")
        self._stack = contextlib.ExitStack()
        self._open = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()
        self._open.clear()

    @property
    def names(self) -> set[str]:
        return set(self._file_of)

    def _handle(self, name):
        path = self._file_of[name]
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(path, "flax"))
        return self._open[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def load(self, name: str) -> jax.Array:
        return self._handle(name).get_tensor(name)


def write_safetensors(tensors: dict[str, jax.Array], directory, name: str = SINGLE_FILE) -> pathlib.Path:
    """Write `tensors` (name -> array of any shape and dtype, bfloat16 included) as one
    DIRECTORY/NAME (model.safetensors by default) with the {"format": "pt"} metadata transformers expects; returns
    its path."""
    path = pathlib.Path(directory) / name
    save_file(tensors, path, metadata={"format": "pt"})
    return path
