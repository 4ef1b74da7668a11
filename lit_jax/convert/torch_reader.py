"""Read PyTorch ``.pth`` checkpoints into numpy without torch and without running code from the file.

``torch.load`` is ``pickle`` underneath, and a pickle can name any importable callable (``os.system``,
``builtins.eval``, ...) and have the loader call it.  This reader unpickles with a :class:`pickle.Unpickler`
subclass whose ``find_class`` only ever hands out this module's own inert stand-ins for the small set
of names a weights checkpoint needs (tensor rebuild functions, storage types, dtypes, ``OrderedDict``,
``torch.Size``, numpy scalars/dtypes/arrays, ...).  Any other global is refused with
:class:`UnsafeCheckpointError` before anything is called; nothing from the file is ever imported.

Two on-disk layouts are supported:

* the zip layout (``torch.save`` default since torch 1.6): ``<name>/data.pkl`` holds the object pickle,
  ``<name>/data/<key>`` holds each storage as raw bytes (``<name>/byteorder`` says ``little``/``big``);
* the legacy stream (``_use_new_zipfile_serialization=False``): magic-number pickle, protocol-version
  pickle, sys-info pickle, the object pickle, a pickle with the sorted storage keys, then per storage an
  8-byte little-endian element count followed by the raw little-endian bytes.

Tensors (and ``nn.Parameter``\\ s) come back as C-contiguous ``numpy.ndarray`` copies with the tensor's
dtype (``bfloat16``/float8 via ``ml_dtypes``), shape, storage offset and strides honoured, so views,
transposes and tensors sharing a storage come out as torch would show them.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import mmap
import os
import pickle
import pickletools
import struct
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any, Callable

import ml_dtypes
import numpy as np

__all__ = [
    "CheckpointFormatError",
    "TorchDtype",
    "UnknownObject",
    "UnsafeCheckpointError",
    "extract_state_dict",
    "read_pth",
]

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001
# Refuse tensors claiming absurd sizes (a corrupt or hostile header) before numpy tries to allocate them.
_MAX_TENSOR_BYTES = 1 << 44
# Overlapping views (stride 0 from expand(), ...) materialise to more bytes than their storage holds. All
# tensors of one file together may materialise at most FACTOR x (file size + storage bytes read) + SLACK
# bytes; a 1.7 KB file expanding a 4-byte storage to 60000 x 60000 is refused instead of taking 13 GiB.
_MATERIALISE_FACTOR = 2
_MATERIALISE_SLACK_BYTES = 256 << 20


class CheckpointFormatError(ValueError):
    """The file is not a readable PyTorch checkpoint: truncated, corrupt, or an unsupported variant."""


class UnsafeCheckpointError(ValueError):
    """The checkpoint's pickle references something outside the allow-list (it could run code)."""


# --------------------------------------------------------------------------------------------------
# dtypes and storage types


class TorchDtype:
    """A ``torch.dtype`` as found in a checkpoint: its torch name and numpy equivalent (``None`` if none)."""

    __slots__ = ("name", "numpy", "itemsize")

    def __init__(self, name: str, numpy_dtype: Any, itemsize: int):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "numpy", None if numpy_dtype is None else np.dtype(numpy_dtype))
        object.__setattr__(self, "itemsize", itemsize)

    def __setattr__(self, key, value):
        raise AttributeError("TorchDtype is immutable")

    def __setstate__(self, state):
        raise UnsafeCheckpointError("a checkpoint pickle tried to modify a torch dtype object")

    def __repr__(self) -> str:
        return f"torch.{self.name}"

    def __eq__(self, other) -> bool:
        return isinstance(other, TorchDtype) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("TorchDtype", self.name))

    def __reduce__(self):
        return (_torch_dtype_by_name, (self.name,))


# name -> (numpy dtype or None, itemsize)
_DTYPE_TABLE: dict[str, tuple[Any, int]] = {
    "float64": (np.float64, 8),
    "float32": (np.float32, 4),
    "float16": (np.float16, 2),
    "bfloat16": (ml_dtypes.bfloat16, 2),
    "complex128": (np.complex128, 16),
    "complex64": (np.complex64, 8),
    "complex32": (None, 4),
    "int64": (np.int64, 8),
    "int32": (np.int32, 4),
    "int16": (np.int16, 2),
    "int8": (np.int8, 1),
    "uint64": (np.uint64, 8),
    "uint32": (np.uint32, 4),
    "uint16": (np.uint16, 2),
    "uint8": (np.uint8, 1),
    "bool": (np.bool_, 1),
    "float8_e4m3fn": (ml_dtypes.float8_e4m3fn, 1),
    "float8_e5m2": (ml_dtypes.float8_e5m2, 1),
    "float8_e4m3fnuz": (ml_dtypes.float8_e4m3fnuz, 1),
    "float8_e5m2fnuz": (ml_dtypes.float8_e5m2fnuz, 1),
    "float8_e8m0fnu": (getattr(ml_dtypes, "float8_e8m0fnu", None), 1),
    "float4_e2m1fn_x2": (None, 1),
    "qint8": (None, 1),
    "quint8": (None, 1),
    "qint32": (None, 4),
    "quint4x2": (None, 1),
    "quint2x4": (None, 1),
    "bits8": (None, 1),
    "bits16": (None, 2),
    "bits1x8": (None, 1),
    "bits2x4": (None, 1),
    "bits4x2": (None, 1),
}
_DTYPES = {name: TorchDtype(name, npd, size) for name, (npd, size) in _DTYPE_TABLE.items()}
# torch's alias attribute names (``torch.float`` ...); pickles use the canonical names, but be lenient.
_DTYPE_ALIASES = {
    "double": "float64", "float": "float32", "half": "float16", "cdouble": "complex128",
    "cfloat": "complex64", "chalf": "complex32", "long": "int64", "int": "int32", "short": "int16",
}


def _torch_dtype_by_name(name: str) -> TorchDtype:
    return _DTYPES[_DTYPE_ALIASES.get(name, name)]


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` & co: only says which dtype the storage's elements have."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: TorchDtype):
        self.name = name
        self.dtype = dtype

    def __setstate__(self, state):
        raise UnsafeCheckpointError(f"a checkpoint pickle tried to modify storage type {self.name}")

    def __repr__(self) -> str:
        return f"<storage type {self.name}>"


_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexDoubleStorage": "complex128", "ComplexFloatStorage": "complex64",
    "QInt8Storage": "qint8", "QUInt8Storage": "quint8", "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
}
_STORAGE_TYPES: dict[str, _StorageType] = {}
for _name, _dt in _STORAGE_DTYPES.items():
    for _module in ("torch", "torch.cuda"):  # torch.cuda.*Storage: legacy checkpoints saved from GPU
        _STORAGE_TYPES[f"{_module}.{_name}"] = _StorageType(f"{_module}.{_name}", _DTYPES[_dt])
for _full in ("torch.storage.UntypedStorage", "torch.UntypedStorage", "torch.storage._UntypedStorage",
              "torch._UntypedStorage", "torch.cuda.UntypedStorage"):
    _STORAGE_TYPES[_full] = _StorageType(_full, _DTYPES["uint8"])
del _name, _dt, _module, _full


# --------------------------------------------------------------------------------------------------
# inert objects handed to the unpickler


class _StandIn:
    """A callable this module provides in place of an allow-listed global.  Immutable from the pickle."""

    __slots__ = ("_fn", "_name")

    def __init__(self, name: str, fn: Callable):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __setattr__(self, key, value):
        raise UnsafeCheckpointError(f"a checkpoint pickle tried to modify {self._name}")

    def __setstate__(self, state):
        raise UnsafeCheckpointError(f"a checkpoint pickle tried to modify {self._name}")

    def __repr__(self) -> str:
        return f"<safe stand-in for {self._name}>"


class _Marker:
    """A non-callable type marker (``torch.Tensor``, ``numpy.ndarray``, ``builtins.object``, ...)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        object.__setattr__(self, "name", name)

    def __setattr__(self, key, value):
        raise UnsafeCheckpointError(f"a checkpoint pickle tried to modify {self.name}")

    def __setstate__(self, state):
        raise UnsafeCheckpointError(f"a checkpoint pickle tried to modify {self.name}")

    def __call__(self, *args, **kwargs):
        raise UnsafeCheckpointError(f"a checkpoint pickle tried to call {self.name}, which is not allowed")

    def __repr__(self) -> str:
        return f"<{self.name}>"


_TENSOR_TYPES = {"torch.Tensor", "torch._tensor.Tensor", "torch.nn.parameter.Parameter",
                 "torch.nn.Parameter"}
_NDARRAY = _Marker("numpy.ndarray")
_OBJECT = _Marker("builtins.object")


class UnknownObject:
    """Inert placeholder for an instance of a class that is not on the allow-list.

    Only produced with ``read_pth(..., allow_unknown_as_placeholder=True)``.  ``qualified_name`` is the
    ``module.name`` the pickle referenced; ``args`` are the constructor arguments recorded from the
    pickle (never passed to the real class), ``state`` whatever the pickle would have handed to
    ``__setstate__``, and ``dict_items`` / ``list_items`` any items it would have added.
    """

    qualified_name = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args = args
        self.kwargs = kwargs
        self.state = None
        self.dict_items = {}
        self.list_items = []
        return self

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.dict_items[key] = value

    def append(self, value):
        self.list_items.append(value)

    def extend(self, values):
        self.list_items.extend(values)

    def __repr__(self) -> str:
        return f"<UnknownObject {self.qualified_name}>"


class _UnknownMeta(type):
    """Metaclass of the per-name placeholder classes: calling one (pickle REDUCE) is always refused."""

    def __call__(cls, *args, **kwargs):
        raise UnsafeCheckpointError(
            f"{cls._checkpoint_path}: refusing to load checkpoint: its pickle calls "
            f"'{cls.qualified_name}', which is not on the allow-list; it was not called"
        )

    def __repr__(cls) -> str:
        return f"<placeholder class for {cls.qualified_name}>"


class _Storage:
    """A storage as referenced by a persistent id; ``raw`` is ``None`` during the legacy scan pass."""

    __slots__ = ("key", "dtype", "numel", "raw")

    def __init__(self, key: str, dtype: TorchDtype, numel: int, raw):
        self.key, self.dtype, self.numel, self.raw = key, dtype, numel, raw

    def __setstate__(self, state):
        raise UnsafeCheckpointError("a checkpoint pickle tried to modify a storage")


_SCAN_RESULT = _Marker("tensor (scan pass)")


class _Refused:
    """Stands for a tensor refused by the materialisation budget until its key is known (see _unpickle)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason

    def __setstate__(self, state):
        raise UnsafeCheckpointError("a checkpoint pickle tried to modify a refused tensor")


# --------------------------------------------------------------------------------------------------
# the unpickler


def _as_int_tuple(value, what: str, path: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise CheckpointFormatError(f"{path}: tensor {what} must be a tuple of ints, got {value!r}")
    return tuple(value)


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves globals only to this module's stand-ins.

    ``storage_source(key, storage_type, numel, view_metadata)`` returns the ``_Storage`` for a
    persistent id; it is format specific (zip record, legacy stream, or the legacy scan pass).
    """

    def __init__(self, file, *, path: str, storage_source, allow_placeholders: bool):
        super().__init__(file, encoding="utf-8")
        self._path = path
        self._storage_source = storage_source
        self._allow_placeholders = allow_placeholders
        self._placeholders: dict[str, type] = {}
        self._globals = self._build_globals()
        self._file_bytes = os.path.getsize(path)
        self._storage_bytes: dict[str, int] = {}  # storage key -> bytes read
        self._materialised = 0  # bytes of all tensors built so far
        self.refused: list[_Refused] = []

    # -- errors -------------------------------------------------------------------------------------

    def _format_error(self, msg: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{self._path}: {msg}")

    def _unsafe(self, full: str, written: str) -> UnsafeCheckpointError:
        alias = f" (written as '{written}')" if written != full else ""
        return UnsafeCheckpointError(
            f"{self._path}: refusing to load checkpoint: its pickle references '{full}'{alias}, which "
            "is not on the allow-list of tensor/container types; torch.load(weights_only=False) would "
            "import and possibly call it. Nothing was executed. Pass "
            "allow_unknown_as_placeholder=True to read non-callable objects as inert placeholders."
        )

    # -- pickle hooks -------------------------------------------------------------------------------

    def find_class(self, module, name):
        written = f"{module}.{name}"
        if not isinstance(module, str) or not isinstance(name, str):
            raise self._format_error(f"malformed global reference {written!r}")
        # Python-2 era names (protocol <= 2 pickles, e.g. '__builtin__.set'); the stock find_class
        # applies this mapping itself, an override has to do it.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        found = self._globals.get(full)
        if found is not None:
            return found
        if module == "torch":
            dtype_name = _DTYPE_ALIASES.get(name, name)
            if dtype_name in _DTYPES:
                return _DTYPES[dtype_name]
        if full in _STORAGE_TYPES:
            return _STORAGE_TYPES[full]
        if self._allow_placeholders:
            return self._placeholder_class(full)
        raise self._unsafe(full, written)

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise self._format_error(f"malformed persistent id {pid!r}")
        tag = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
        if tag != "storage":
            raise self._format_error(
                f"unsupported persistent id kind {tag!r} (only tensor storages are supported; "
                "'module' means a whole nn.Module was pickled)"
            )
        if len(pid) == 5:
            _, storage_type, key, _location, numel = pid
            view = None
        elif len(pid) == 6:
            _, storage_type, key, _location, numel, view = pid
        else:
            raise self._format_error(f"malformed storage record {pid!r}")
        if not isinstance(storage_type, _StorageType):
            raise self._format_error(f"storage record names {storage_type!r}, not a storage type")
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise self._format_error(f"malformed storage record {pid!r}")
        if view is not None:
            if not (isinstance(view, tuple) and len(view) == 3 and all(isinstance(v, (int, str, bytes))
                                                                       for v in view)):
                raise self._format_error(f"malformed storage view record {view!r}")
        storage = self._storage_source(key, storage_type, numel, view)
        if storage.raw is not None:
            self._storage_bytes[key] = max(self._storage_bytes.get(key, 0), len(storage.raw))
        return storage

    # -- allow-listed globals -----------------------------------------------------------------------

    def _build_globals(self) -> dict[str, Any]:
        g: dict[str, Any] = {}

        def add(names, fn):
            for full in names if isinstance(names, (list, tuple)) else [names]:
                g[full] = _StandIn(full, fn)

        add("torch._utils._rebuild_tensor", self._rebuild_tensor_v1)
        add("torch._utils._rebuild_tensor_v2", self._rebuild_tensor_v2)
        add("torch._utils._rebuild_tensor_v3", self._rebuild_tensor_v3)
        add("torch._utils._rebuild_parameter", self._rebuild_parameter)
        add("torch._utils._rebuild_parameter_with_state", self._rebuild_parameter)
        add(["torch._tensor._rebuild_from_type_v2", "torch._tensor._rebuild_from_type",
             "torch.tensor._rebuild_from_type_v2", "torch.tensor._rebuild_from_type"],
            self._rebuild_from_type)
        add("torch._utils._rebuild_device_tensor_from_numpy", self._rebuild_from_data)
        add("torch._utils._rebuild_device_tensor_from_cpu_tensor", self._rebuild_from_data)
        for unsupported, what in [
            ("torch._utils._rebuild_qtensor", "quantized tensors"),
            ("torch._utils._rebuild_sparse_tensor", "sparse tensors"),
            ("torch._utils._rebuild_sparse_csr_tensor", "sparse tensors"),
            ("torch._utils._rebuild_nested_tensor", "nested tensors"),
            ("torch._utils._rebuild_meta_tensor_no_storage", "meta tensors (they hold no data)"),
            ("torch._utils._rebuild_wrapper_subclass", "tensor wrapper subclasses"),
            ("torch._utils._rebuild_xla_tensor", "XLA tensors"),
            ("torch._utils._rebuild_mlc_tensor", "MLC tensors"),
            ("torch.serialization._get_layout", "sparse tensor layouts"),
        ]:
            add(unsupported, self._unsupported(unsupported, what))
        for full in _TENSOR_TYPES:
            g[full] = _Marker(full)
        add("torch.Size", self._torch_size)
        add("torch.device", self._torch_device)
        add("collections.OrderedDict", self._ordered_dict)
        add("collections.Counter", self._counter)
        add("builtins.set", lambda items=(): set(self._iterable(items, "set")))
        add("builtins.frozenset", lambda items=(): frozenset(self._iterable(items, "frozenset")))
        add("builtins.bytearray", self._bytearray)
        add("builtins.complex", self._complex)
        add("_codecs.encode", self._codecs_encode)
        add("copyreg._reconstructor", self._copyreg_reconstructor)
        g["builtins.object"] = _OBJECT
        add(["numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"], self._np_scalar)
        add(["numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"],
            self._np_reconstruct)
        add("numpy.dtype", self._np_dtype)
        g["numpy.ndarray"] = _NDARRAY
        return g

    def _placeholder_class(self, full: str) -> type:
        cls = self._placeholders.get(full)
        if cls is None:
            cls = _UnknownMeta(
                "UnknownObject", (UnknownObject,),
                {"qualified_name": full, "_checkpoint_path": self._path, "__module__": __name__},
            )
            self._placeholders[full] = cls
        return cls

    def _unsupported(self, full: str, what: str):
        def fn(*args, **kwargs):
            raise self._format_error(f"uses {full}: {what} are not supported by this reader")
        return fn

    # tensors

    def _tensor(self, storage, offset, size, stride, dtype: TorchDtype | None = None, metadata=None):
        path = self._path
        if not isinstance(storage, _Storage):
            raise self._format_error(f"tensor rebuild got {type(storage).__name__}, not a storage")
        if storage.raw is None:  # legacy scan pass: storage bytes are not read yet
            return _SCAN_RESULT
        dtype = storage.dtype if dtype is None else dtype
        if not isinstance(dtype, TorchDtype):
            raise self._format_error(f"tensor dtype {dtype!r} is not a torch dtype")
        if dtype.numpy is None:
            raise self._format_error(f"tensor dtype torch.{dtype.name} has no numpy equivalent")
        np_dtype = dtype.numpy
        shape = _as_int_tuple(size, "size", path)
        strides = _as_int_tuple(stride, "stride", path)
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise self._format_error(f"invalid storage offset {offset!r}")
        if len(strides) != len(shape) or any(s < 0 for s in strides) or any(d < 0 for d in shape):
            raise self._format_error(f"invalid tensor geometry size={shape} stride={strides}")
        numel = math.prod(shape)
        if numel * np_dtype.itemsize > _MAX_TENSOR_BYTES:
            raise self._format_error(f"tensor of shape {shape} is implausibly large")
        if numel == 0:
            arr = np.zeros(shape, dtype=np_dtype)
        else:
            raw = storage.raw
            available = len(raw) // np_dtype.itemsize
            needed = offset + sum((d - 1) * s for d, s in zip(shape, strides)) + 1
            if needed > available:
                raise self._format_error(
                    f"storage '{storage.key}' holds {available} {dtype!r} elements but a tensor of "
                    f"shape {shape}, stride {strides}, offset {offset} needs {needed} (truncated file?)"
                )
            refused = self._charge(storage, shape, strides, offset, numel * np_dtype.itemsize)
            if refused is not None:
                return refused
            flat = np.frombuffer(raw, dtype=np_dtype, count=available)
            view = np.lib.stride_tricks.as_strided(
                flat[offset:], shape=shape, strides=tuple(s * np_dtype.itemsize for s in strides),
                writeable=False,
            )
            arr = np.array(view, dtype=np_dtype, copy=True, order="C")
        if metadata:
            if not isinstance(metadata, dict):
                raise self._format_error(f"invalid tensor metadata {metadata!r}")
            if metadata.get("neg"):
                arr = np.negative(arr)
            if metadata.get("conj"):
                arr = np.conj(arr)
        return arr

    def _charge(self, storage, shape, strides, offset, nbytes: int) -> _Refused | None:
        """Counts a tensor's bytes against the file's budget; beyond it, the tensor is refused (not built)."""
        limit = (_MATERIALISE_FACTOR * (self._file_bytes + sum(self._storage_bytes.values()))
                 + _MATERIALISE_SLACK_BYTES)
        if self._materialised + nbytes <= limit:
            self._materialised += nbytes
            return None
        self.refused.append(_Refused(
            f"tensor on storage '{storage.key}' ({len(storage.raw)} bytes) with shape {shape}, stride "
            f"{strides}, offset {offset} would materialise {nbytes} bytes, bringing the file's tensors to "
            f"{self._materialised + nbytes} bytes, more than the {limit} bytes allowed for a "
            f"{self._file_bytes}-byte file (overlapping or stride-0 views expanded far beyond the data; "
            "see docs/conversion.md)"))
        return self.refused[-1]

    def _rebuild_tensor_v1(self, storage, offset, size, stride):
        return self._tensor(storage, offset, size, stride)

    def _rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad=False,
                           backward_hooks=None, metadata=None):
        return self._tensor(storage, offset, size, stride, metadata=metadata)

    def _rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad, backward_hooks,
                           dtype, metadata=None):
        return self._tensor(storage, offset, size, stride, dtype=dtype, metadata=metadata)

    def _check_tensor(self, data, what: str):
        if not (isinstance(data, (np.ndarray, _Refused)) or data is _SCAN_RESULT):
            raise self._format_error(f"{what} got {type(data).__name__} instead of a tensor")
        return data

    def _rebuild_parameter(self, data, requires_grad=False, backward_hooks=None, state=None):
        return self._check_tensor(data, "torch._utils._rebuild_parameter")

    def _rebuild_from_data(self, data, dtype=None, device=None, requires_grad=False):
        data = self._check_tensor(data, "device tensor rebuild")
        if data is _SCAN_RESULT or isinstance(data, _Refused):
            return data
        return np.array(data, copy=True, order="C")

    def _rebuild_from_type(self, func, new_type, args, state=None):
        allowed = {self._globals[n] for n in (
            "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
            "torch._utils._rebuild_tensor_v3", "torch._utils._rebuild_parameter",
            "torch._utils._rebuild_parameter_with_state",
            "torch._utils._rebuild_device_tensor_from_numpy",
            "torch._utils._rebuild_device_tensor_from_cpu_tensor")}
        if not any(func is f for f in allowed):
            raise self._format_error(f"_rebuild_from_type_v2 with unsupported function {func!r}")
        if not (isinstance(new_type, _Marker) and new_type.name in _TENSOR_TYPES) and not (
            isinstance(new_type, type) and issubclass(new_type, UnknownObject)
        ):
            raise self._format_error(f"_rebuild_from_type_v2 with unsupported type {new_type!r}")
        if not isinstance(args, tuple):
            raise self._format_error("_rebuild_from_type_v2 arguments must be a tuple")
        # A tensor subclass (placeholder type) comes back as a plain array; its state is dropped.
        return self._check_tensor(func(*args), "_rebuild_from_type_v2")

    # containers and small values

    def _iterable(self, items, what: str):
        if not isinstance(items, (list, tuple, set, frozenset)):
            raise self._format_error(f"{what}() argument must be a list/tuple, got {type(items).__name__}")
        return items

    def _ordered_dict(self, items=()):
        if isinstance(items, (dict, list, tuple)):
            return collections.OrderedDict(items)
        raise self._format_error(f"OrderedDict() argument of type {type(items).__name__}")

    def _counter(self, items=()):
        if isinstance(items, dict):
            return collections.Counter(items)
        raise self._format_error(f"Counter() argument of type {type(items).__name__}")

    def _torch_size(self, dims=()):
        return _as_int_tuple(dims, "torch.Size", self._path)

    def _torch_device(self, kind, index=None):
        if not isinstance(kind, str) or not (index is None or isinstance(index, int)):
            raise self._format_error(f"invalid torch.device({kind!r}, {index!r})")
        return kind if index is None else f"{kind}:{index}"

    def _codecs_encode(self, obj, encoding="utf-8", errors="strict"):
        if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
            raise self._format_error(f"unsupported _codecs.encode({type(obj).__name__}, {encoding!r})")
        return obj.encode(encoding)

    def _bytearray(self, data=b"", encoding=None):
        if isinstance(data, bytes) and encoding is None:
            return bytearray(data)
        if isinstance(data, str) and encoding in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
            return bytearray(data, encoding)
        raise self._format_error("unsupported bytearray() arguments")

    def _complex(self, real=0.0, imag=0.0):
        if all(isinstance(v, (int, float)) for v in (real, imag)):
            return complex(real, imag)
        raise self._format_error("unsupported complex() arguments")

    def _copyreg_reconstructor(self, cls, base, state):
        # protocol 0/1 pickles of plain class instances; only placeholders can get here.
        if isinstance(cls, type) and issubclass(cls, UnknownObject):
            obj = UnknownObject.__new__(cls)
            if state is not None:
                obj.args = (state,)
            return obj
        raise self._format_error(f"copyreg._reconstructor of {cls!r}")

    # numpy metadata (numpy scalars, dtypes and small arrays inside a checkpoint's meta)

    def _np_dtype(self, spec, align=False, copy=False):
        if not isinstance(spec, str):
            raise self._format_error(f"numpy.dtype({spec!r}) is not supported")
        # Always copy: BUILD then calls dtype.__setstate__, which must not touch numpy's singletons.
        return np.dtype(spec, align=bool(align), copy=True)

    def _np_scalar(self, dtype, data=None):
        if not isinstance(dtype, np.dtype):
            raise self._format_error(f"numpy scalar with dtype {dtype!r}")
        if dtype.hasobject:
            return data
        if not isinstance(data, bytes) or len(data) != dtype.itemsize:
            raise self._format_error("numpy scalar with malformed data")
        return np.frombuffer(data, dtype=dtype, count=1)[0]

    def _np_reconstruct(self, subtype, shape=(0,), dtype=b"b"):
        if subtype is not _NDARRAY:
            raise self._format_error(f"numpy array of subtype {subtype!r} is not supported")
        # numpy's ndarray.__setstate__ (pickle BUILD) then sets shape, dtype and (validated) data.
        return np.empty((0,), dtype=np.int8)


class _HeaderUnpickler(pickle.Unpickler):
    """For the legacy stream's small pickles (magic number, version, sys info, storage keys): no globals."""

    def __init__(self, file, *, path: str, what: str, unsafe_globals: bool):
        super().__init__(file, encoding="utf-8")
        self._path, self._what, self._unsafe_globals = path, what, unsafe_globals

    def find_class(self, module, name):
        if self._unsafe_globals:
            raise UnsafeCheckpointError(
                f"{self._path}: refusing to load checkpoint: its {self._what} pickle references "
                f"'{module}.{name}'; nothing was executed"
            )
        raise CheckpointFormatError(f"{self._path}: not a PyTorch checkpoint ({self._what} is not a "
                                    "plain value)")

    def persistent_load(self, pid):
        raise CheckpointFormatError(f"{self._path}: unexpected persistent id in the {self._what}")


_MEMO_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


def _prescan(file, path: str, what: str, limit: int) -> None:
    """Walk a pickle's opcodes without executing anything before the C unpickler runs it.

    Rejects garbage early (as a format error) and memo indices larger than the pickle itself: the C
    unpickler sizes its memo table by the largest index, so a crafted index could make it allocate
    gigabytes.  Leaves ``file`` where it was.
    """
    start = file.tell()
    try:
        for opcode, arg, _pos in pickletools.genops(file):
            if opcode.name in _MEMO_PUT_OPS and isinstance(arg, int) and not 0 <= arg <= limit:
                raise CheckpointFormatError(f"{path}: corrupt checkpoint ({what}: memo index {arg})")
    except CheckpointFormatError:
        raise
    except Exception as e:  # ValueError for bad/truncated opcodes from pickletools
        raise CheckpointFormatError(f"{path}: truncated or corrupt checkpoint ({what}: {e})") from e
    finally:
        file.seek(start)


def _unpickle(unpickler: pickle.Unpickler, path: str, what: str):
    try:
        obj = unpickler.load()
    except (UnsafeCheckpointError, CheckpointFormatError) as e:
        if str(e).startswith(f"{path}:"):
            raise
        raise type(e)(f"{path}: {e}") from e  # raised by a stand-in that does not know the path
    except EOFError as e:
        raise CheckpointFormatError(f"{path}: truncated checkpoint ({what} ends early)") from e
    except Exception as e:  # UnpicklingError, TypeError from bad arguments, MemoryError ...
        raise CheckpointFormatError(
            f"{path}: corrupt or unsupported checkpoint ({what}: {type(e).__name__}: {e})"
        ) from e
    refused = getattr(unpickler, "refused", None)
    if refused:
        where = _key_of(obj, refused[0], "", set())
        raise CheckpointFormatError(f"{path}: key '{where or '?'}': {refused[0].reason}")
    return obj


def _key_of(obj, target, where: str, seen: set) -> str | None:
    """The dotted key path of ``target`` inside nested dicts/lists/tuples, or None."""
    if obj is target:
        return where
    if id(obj) in seen or not isinstance(obj, (dict, list, tuple)):
        return None
    seen.add(id(obj))
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for k, v in items:
        found = _key_of(v, target, f"{where}.{k}" if where else str(k), seen)
        if found is not None:
            return found
    return None


# --------------------------------------------------------------------------------------------------
# storage bytes


def _swap_bytes(raw: bytes, dtype: TorchDtype) -> bytes:
    """Big-endian storage record -> little-endian bytes (complex: swap each component)."""
    unit = dtype.itemsize // 2 if dtype.name.startswith("complex") else dtype.itemsize
    if unit <= 1:
        return raw
    usable = len(raw) - len(raw) % unit
    swapped = np.frombuffer(raw, dtype=np.dtype(f"u{unit}"), count=usable // unit).byteswap()
    return swapped.tobytes() + raw[usable:]


class _StorageCache:
    """Raw storage bytes by key, reinterpreted per dtype as requested (tensors may share a storage)."""

    def __init__(self, path: str, read_raw: Callable[[str], bytes], big_endian: bool = False):
        self._path = path
        self._read_raw = read_raw
        self._big_endian = big_endian
        self._raw: dict[str, bytes] = {}
        self._by_dtype: dict[tuple[str, str], bytes] = {}

    def __call__(self, key: str, storage_type: _StorageType, numel: int, view) -> _Storage:
        dtype = storage_type.dtype
        raw = self._raw.get(key)
        if raw is None:
            raw = self._read_raw(key)
            self._raw[key] = raw
        if len(raw) < numel * dtype.itemsize:
            raise CheckpointFormatError(
                f"{self._path}: storage '{key}' has {len(raw)} bytes but its record declares {numel} "
                f"{dtype!r} elements ({numel * dtype.itemsize} bytes); the file is truncated or corrupt"
            )
        if self._big_endian:
            cached = self._by_dtype.get((key, dtype.name))
            if cached is None:
                cached = self._by_dtype[(key, dtype.name)] = _swap_bytes(raw, dtype)
            raw = cached
        if view is not None:  # legacy storage view: (view_key, offset, size) in elements
            _view_key, v_offset, v_size = view
            if not (isinstance(v_offset, int) and isinstance(v_size, int) and v_offset >= 0 and v_size >= 0):
                raise CheckpointFormatError(f"{self._path}: malformed storage view {view!r}")
            start, stop = v_offset * dtype.itemsize, (v_offset + v_size) * dtype.itemsize
            if stop > len(raw):
                raise CheckpointFormatError(f"{self._path}: storage view {view!r} exceeds storage '{key}'")
            raw = raw[start:stop]
            numel = v_size
        return _Storage(key, dtype, numel, raw)


# --------------------------------------------------------------------------------------------------
# formats


def _read_zip(path: str, allow_placeholders: bool):
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CheckpointFormatError(f"{path}: truncated or corrupt zip checkpoint ({e})") from e
    with zf:
        names = zf.namelist()
        pkls = [n for n in names if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
        if len(pkls) != 1:
            if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
                raise CheckpointFormatError(
                    f"{path}: this is a TorchScript archive (torch.jit.save), not a torch.save "
                    "checkpoint; it is not supported"
                )
            raise CheckpointFormatError(
                f"{path}: zip archive without exactly one '<name>/data.pkl' record "
                f"(found {pkls or 'none'}); not a torch.save checkpoint"
            )
        prefix = pkls[0][: -len("data.pkl")]
        name_set = set(names)

        def read_record(name: str) -> bytes:
            try:
                return zf.read(name)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError,
                    RuntimeError) as e:
                raise CheckpointFormatError(f"{path}: corrupt zip record '{name}' ({e})") from e

        big_endian = False
        if prefix + "byteorder" in name_set:
            order = read_record(prefix + "byteorder").strip()
            if order not in (b"little", b"big"):
                raise CheckpointFormatError(f"{path}: unknown byteorder record {order!r}")
            big_endian = order == b"big"

        def read_storage(key: str) -> bytes:
            name = f"{prefix}data/{key}"
            if name not in name_set:
                raise CheckpointFormatError(
                    f"{path}: storage record '{name}' referenced by the pickle is missing from the "
                    "archive (truncated or corrupt file)"
                )
            return read_record(name)

        data = io.BytesIO(read_record(pkls[0]))
        _prescan(data, path, "data.pkl", len(data.getbuffer()))
        unpickler = _SafeUnpickler(
            data, path=path, storage_source=_StorageCache(path, read_storage, big_endian),
            allow_placeholders=allow_placeholders,
        )
        return _unpickle(unpickler, path, "data.pkl")


class _MMapFile:
    """File-like view of an mmap for the C unpickler: reads never allocate beyond the file's end."""

    def __init__(self, mm: mmap.mmap):
        self._mm = mm
        self.read = mm.read
        self.readline = mm.readline
        self.tell = mm.tell
        self.seek = mm.seek

    def readinto(self, buf) -> int:
        data = self._mm.read(len(buf))
        buf[: len(data)] = data
        return len(data)


def _read_legacy(path: str, allow_placeholders: bool):
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise CheckpointFormatError(f"{path}: empty file, not a PyTorch checkpoint")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            f = _MMapFile(mm)

            def header(what: str, unsafe: bool = False):
                _prescan(f, path, what, size)
                return _unpickle(_HeaderUnpickler(f, path=path, what=what, unsafe_globals=unsafe),
                                 path, what)

            # The stream opens with the pickled magic number (binary or, for protocols 0/1, decimal).
            head = mm[:64]
            if (_LEGACY_MAGIC_NUMBER.to_bytes(10, "little") not in head[:32]
                    and str(_LEGACY_MAGIC_NUMBER).encode() not in head):
                raise CheckpointFormatError(
                    f"{path}: not a PyTorch checkpoint (neither a zip archive nor a legacy torch.save "
                    "stream: no magic number)"
                )
            try:
                magic = header("magic number")
            except CheckpointFormatError as e:
                raise CheckpointFormatError(
                    f"{path}: not a PyTorch checkpoint (neither a zip archive nor a legacy torch.save "
                    f"stream): {e}"
                ) from e
            if magic != _LEGACY_MAGIC_NUMBER:
                raise CheckpointFormatError(
                    f"{path}: not a PyTorch checkpoint (neither a zip archive nor a legacy torch.save "
                    "stream with the right magic number)"
                )
            version = header("protocol version")
            if version != _LEGACY_PROTOCOL_VERSION:
                raise CheckpointFormatError(f"{path}: unsupported legacy protocol version {version!r}")
            sys_info = header("sys info")
            if not isinstance(sys_info, dict):
                raise CheckpointFormatError(f"{path}: malformed legacy sys info {sys_info!r}")
            main_start = f.tell()

            # Pass 1: learn each storage's element type (needed to size its bytes after the pickle).
            declared: dict[str, tuple[TorchDtype, int]] = {}

            def scan_source(key, storage_type, numel, view):
                declared.setdefault(key, (storage_type.dtype, numel))
                return _Storage(key, storage_type.dtype, numel, None)

            _prescan(f, path, "object pickle", size)
            _unpickle(_SafeUnpickler(f, path=path, storage_source=scan_source,
                                     allow_placeholders=allow_placeholders), path, "object pickle")
            keys = header("storage key list", unsafe=True)
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise CheckpointFormatError(f"{path}: malformed storage key list")
            raw_by_key: dict[str, bytes] = {}
            pos = f.tell()
            for key in keys:
                if key not in declared:
                    raise CheckpointFormatError(f"{path}: storage '{key}' listed but never referenced")
                dtype, numel = declared[key]
                if pos + 8 > size:
                    raise CheckpointFormatError(f"{path}: truncated checkpoint (storage '{key}' header)")
                (count,) = struct.unpack("<q", mm[pos : pos + 8])
                nbytes = count * dtype.itemsize
                if count < 0 or pos + 8 + nbytes > size:
                    raise CheckpointFormatError(
                        f"{path}: truncated checkpoint (storage '{key}' needs {max(nbytes, 0)} bytes, "
                        f"{size - pos - 8} left)"
                    )
                raw_by_key[key] = mm[pos + 8 : pos + 8 + nbytes]
                pos += 8 + nbytes

            def read_storage(key: str) -> bytes:
                if key not in raw_by_key:
                    raise CheckpointFormatError(
                        f"{path}: storage '{key}' referenced by the pickle has no data (corrupt file)"
                    )
                return raw_by_key[key]

            # Pass 2: the same object pickle again, now with the storage bytes at hand.
            f.seek(main_start)
            return _unpickle(
                _SafeUnpickler(f, path=path, storage_source=_StorageCache(path, read_storage),
                               allow_placeholders=allow_placeholders),
                path, "object pickle",
            )


def read_pth(path, *, allow_unknown_as_placeholder: bool = False) -> Any:
    """Load a ``torch.save`` checkpoint as plain Python containers holding numpy arrays.

    Tensors and ``nn.Parameter``\\ s become C-contiguous ``np.ndarray`` copies; ``torch.Size`` becomes a
    tuple, ``torch.device`` a string such as ``'cuda:0'``, a ``torch.dtype`` a :class:`TorchDtype`.
    Dicts, OrderedDicts, lists, tuples, sets, strings, bytes and numbers come back as themselves, numpy
    scalars/dtypes/arrays as numpy objects.

    Raises ``FileNotFoundError`` for a missing file, :class:`CheckpointFormatError` for a truncated,
    corrupt or unsupported file, and :class:`UnsafeCheckpointError` when the pickle references anything
    outside the allow-list.  With ``allow_unknown_as_placeholder=True``, instances of unknown classes
    (``argparse.Namespace``, config objects in ``meta``, ...) are read as inert :class:`UnknownObject`
    placeholders instead; unknown callables invoked by the pickle are still refused and never called.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(2, f"checkpoint not found: {path}", path)
    with open(path, "rb") as fh:
        head = fh.read(512)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _read_zip(path, allow_unknown_as_placeholder)
    if len(head) >= 262 and head[257:262] == b"ustar":
        raise CheckpointFormatError(
            f"{path}: tar-based checkpoint from torch < 0.4; this format is not supported"
        )
    if not head.startswith(b"\x80") and zipfile.is_zipfile(path):  # zip with a prepended stub
        return _read_zip(path, allow_unknown_as_placeholder)
    return _read_legacy(path, allow_unknown_as_placeholder)


# --------------------------------------------------------------------------------------------------
# state dict extraction


def _as_state_dict(candidate) -> tuple[dict[str, np.ndarray] | None, str]:
    """Return (flat dict, '') if ``candidate`` maps names to arrays, else (None, reason)."""
    if not isinstance(candidate, Mapping):
        return None, f"is a {type(candidate).__name__}, not a mapping"
    if not candidate:
        return None, "is empty"
    out: dict[str, np.ndarray] = {}
    for key, value in candidate.items():
        if not isinstance(key, str):
            return None, f"has a non-string key {key!r}"
        if isinstance(value, np.generic):
            value = np.asarray(value)
        if not isinstance(value, np.ndarray):
            return None, f"has a non-tensor value at {key!r} ({type(value).__name__})"
        out[key] = value
    return out, ""


def extract_state_dict(obj, path="<checkpoint>") -> dict[str, np.ndarray]:
    """Find the model weights in a loaded checkpoint and return them as a flat ``{name: array}``.

    Accepts a bare state_dict or one nested under ``'state_dict'`` or ``'model'`` (checked first, also
    one level deeper, e.g. ``{'model': {'state_dict': ...}}``).  A ``module.`` prefix (DataParallel /
    DistributedDataParallel) is stripped from the keys.
    """
    path = os.fspath(path)
    candidates: list[tuple[str, Any]] = []

    def collect(node, where: str, depth: int):
        if isinstance(node, Mapping) and depth < 2:
            for k in ("state_dict", "model"):
                if k in node:
                    collect(node[k], f"{where}[{k!r}]", depth + 1)
        candidates.append((where, node))

    collect(obj, "checkpoint", 0)
    reasons = []
    for where, node in candidates:
        flat, reason = _as_state_dict(node)
        if flat is None:
            reasons.append(f"{where} {reason}")
            continue
        result: dict[str, np.ndarray] = {}
        for key, value in flat.items():
            new_key = key[len("module."):] if key.startswith("module.") else key
            if new_key in result:
                raise CheckpointFormatError(
                    f"{path}: key {new_key!r} appears both with and without the 'module.' prefix"
                )
            result[new_key] = value
        return result
    top = list(obj.keys()) if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointFormatError(
        f"{path}: no state_dict found (expected a mapping of names to tensors at the top level or under "
        f"'state_dict' / 'model'). Top-level keys: {top}. Details: {'; '.join(reasons)}"
    )
