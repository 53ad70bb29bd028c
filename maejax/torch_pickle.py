"""PyTorch's zip checkpoint format (what `torch.save` writes since 1.6) read into numpy, without PyTorch.

The unpickler resolves only what a state dict holds (tensors, ordered dicts, containers, numbers,
strings), like `torch.load(weights_only=True)`: any other global is refused by name, so a checkpoint
cannot run code. Tensors are rebuilt from their storage bytes (`<archive>/data/<key>`), offset, shape
and strides, the way `torch._utils._rebuild_tensor_v2` does.
"""
from __future__ import annotations

import collections
import functools
import pickle
import zipfile

import ml_dtypes
import numpy as np

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _Storage:
    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


def _rebuild_tensor(where: str, storage: np.ndarray, offset: int, size: tuple, stride: tuple, *unused) -> np.ndarray:
    if any(n == 0 for n in size):
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or min(stride, default=0) < 0 or last >= len(storage):
        raise pickle.UnpicklingError(f"{where}: a tensor of shape {tuple(size)}, strides {tuple(stride)} at "
                                     f"offset {offset} runs past its storage of {len(storage)} values")
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=[s * storage.itemsize for s in stride])
    return np.array(view)          # a contiguous copy; 0-d tensors stay 0-d arrays


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(file)
        self.archive, self.prefix, self.path = archive, prefix, path
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return functools.partial(_rebuild_tensor, self.path)
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in STORAGE_DTYPES:
            return _Storage(STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"{self.path}: refusing to load {module}.{name}: a state dict of "
                                     "tensors holds no such object")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage_type, _Storage):
            raise pickle.UnpicklingError(f"{self.path}: unsupported persistent id {pid!r}")
        if key not in self.storages:
            name = f"{self.prefix}/data/{key}"
            raw = self.archive.read(name)
            if len(raw) < numel * storage_type.dtype.itemsize:
                raise pickle.UnpicklingError(f"{self.path}: {name} holds {len(raw)} bytes, fewer than its "
                                             f"{numel} {storage_type.dtype} values")
            self.storages[key] = np.frombuffer(raw, storage_type.dtype, count=numel)
        return self.storages[key]


def load(path: str):
    """The object a torch zip pickle holds, with every tensor as a numpy array (little-endian files)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path}: not a readable torch zip checkpoint ({e})") from e
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: not a torch zip checkpoint (expected one */data.pkl, found {pickles})")
        prefix = pickles[0][: -len("/data.pkl")]
        names = set(archive.namelist())
        if f"{prefix}/byteorder" in names and archive.read(f"{prefix}/byteorder") != b"little":
            raise ValueError(f"{path}: big-endian torch checkpoints are not supported")
        with archive.open(pickles[0]) as f:
            return _Unpickler(f, archive, prefix, path).load()
