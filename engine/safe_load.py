"""Every read of a pickle-based file: tensors and plain data only, through exact (module, name) allow-lists.

The engine reads four pickle-based formats, all here and nowhere else:
- torch's zip/legacy checkpoints (`.pt`, `.bin`, DeepSpeed's files): `torch.load(weights_only=True)`, whose
  unpickler resolves a global only when its exact "module.name" is on torch's list or ours
  (`DEEPSPEED_GLOBALS`); `tensor_only_torch_load()` makes every `torch.load` inside DeepSpeed's own code
  (checkpoint loading, universal conversion, zero_to_fp32) weights_only too.
- DCP's `.metadata` (FSDP2 checkpoints): `read_dcp_metadata`, an unpickler over `DCP_METADATA_GLOBALS`.
- TorchScript archives (OpenAI's released `.pt` files): `read_torchscript_state_dict` reads `data.pkl` and the
  tensor records as data; TorchScript (`torch.jit.load`) never runs, so no scripted `__setstate__` can.

`RestrictedUnpickler.find_class` looks the pair up in a dict and returns what the dict holds: it never
imports a module or walks attributes, so a dotted name ("os.system" inside an allowed module) or an
extension-registry code resolves to nothing.
"""

from __future__ import annotations

import collections
import contextlib
import io
import pickle
import re
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DCP_METADATA_GLOBALS", "TORCHSCRIPT_GLOBALS", "RestrictedUnpickler", "UnsafeFileError", "deepspeed_globals",
    "load_tensor_file", "read_dcp_metadata", "read_torchscript_state_dict", "tensor_only_torch_load",
]

_DTYPES = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}


class UnsafeFileError(ValueError):
    """A file asks for something a tensor file never needs (a global outside the allow-list, a path outside
    its folder); it was not unpickled."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose globals are exactly the values of `allowed` ((module, name) -> object)."""

    def __init__(self, file, *, allowed: Mapping[tuple[str, str], Any], what: str,
                 persistent_load: Callable[[Any], Any] | None = None):
        super().__init__(file)
        self._allowed = allowed
        self._what = what
        self._persistent = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in {self._what}") from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise pickle.UnpicklingError(f"{self._what} holds a persistent reference, which it never needs")
        return self._persistent(pid)


# ----- torch.load (weights_only) -----

def deepspeed_globals() -> list[type]:
    """Plain-data classes DeepSpeed pickles into its checkpoints (construction runs no code of the file's)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _unpickler_reason(err: BaseException) -> str:
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", str(err), flags=re.DOTALL)
    return (match.group(1).strip() if match else str(err).strip().splitlines()[0] if str(err).strip()
            else type(err).__name__)[:300]


_original_torch_load = torch.load


def load_tensor_file(path: str | Path, *, map_location: Any = "cpu", mmap: bool = False,
                     extra_globals: list[type] | tuple[type, ...] = ()) -> Any:
    """`torch.load(path, weights_only=True)` with `extra_globals` allowed; refusal and damage are one
    `ValueError` naming the file (UnsafeFileError when the file needs a global outside the lists)."""
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            return _original_torch_load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise UnsafeFileError(
            f"refusing to load {path}: it needs more than tensors and plain data ({_unpickler_reason(err)}); "
            "unpickling it could run code. Re-save only the state dict (or .safetensors) where it is trusted"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, IndexError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"cannot read {path} ({type(err).__name__}: {_unpickler_reason(err)}); "
                         "is the file complete?") from None


_guard_lock = threading.Lock()
_open_guards: list[tuple[type, ...]] = []  # extra globals of each open guard; torch.load is replaced while any is


def _guarded_torch_load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kwargs):
    """`torch.load` while a guard is open: weights_only whatever the caller asked, the guards' globals allowed."""
    if pickle_module is not None or kwargs:
        raise UnsafeFileError(f"refusing torch.load of {f} with {pickle_module or sorted(kwargs)}")
    allowed = list(dict.fromkeys(cls for extra in _open_guards for cls in extra))
    return load_tensor_file(f, map_location=map_location, mmap=bool(mmap), extra_globals=allowed)


@contextlib.contextmanager
def tensor_only_torch_load(extra_globals: list[type] | tuple[type, ...] = ()) -> Iterator[None]:
    """Within the block, every `torch.load` of the process (DeepSpeed's included, which pass weights_only=False)
    loads weights_only with `extra_globals` allowed; a `pickle_module` argument is refused. Blocks may nest
    or overlap (threads): torch.load is itself again once the last one closes."""
    entry = tuple(extra_globals)
    with _guard_lock:
        _open_guards.append(entry)
        torch.load = _guarded_torch_load
    try:
        yield
    finally:
        with _guard_lock:
            _open_guards.remove(entry)
            if not _open_guards:
                torch.load = _original_torch_load


# ----- DCP metadata -----

def _path_text(*parts: str) -> str:
    """A pickled path's text: its parts joined (strings only)."""
    if not all(isinstance(part, str) for part in parts):
        raise pickle.UnpicklingError("a path made of non-strings")
    return "/".join(parts)


def _dcp_metadata_globals() -> dict[tuple[str, str], Any]:
    from torch.distributed.checkpoint import filesystem, metadata

    allowed: dict[tuple[str, str], Any] = {
        (metadata.__name__, cls.__name__): cls
        for cls in (metadata.Metadata, metadata.TensorStorageMetadata, metadata.BytesStorageMetadata,
                    metadata.ChunkStorageMetadata, metadata.TensorProperties, metadata.MetadataIndex,
                    metadata.StorageMeta, metadata._MEM_FORMAT_ENCODING)
    }
    allowed[(filesystem.__name__, "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # a layout by its name
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    # StorageMeta.checkpoint_id is a path: kept as its text (never used to reach a file).
    allowed[("pathlib", "PosixPath")] = _path_text
    allowed[("pathlib", "PurePosixPath")] = _path_text
    allowed.update({("torch", name): dtype for name, dtype in _DTYPES.items()})
    return allowed


DCP_METADATA_GLOBALS: Mapping[tuple[str, str], Any] = _dcp_metadata_globals()
_DCP_DATA_FILE = re.compile(r"__\d+_\d+\.distcp")


def read_dcp_metadata(path: str | Path):
    """DCP's `Metadata` from a `.metadata` file: its own classes only, every data file named inside the
    checkpoint folder, tensors only (DCP reads other entries with weights_only=False)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {path} ({err.strerror or err})") from None
    try:
        metadata = RestrictedUnpickler(io.BytesIO(data), allowed=DCP_METADATA_GLOBALS,
                                       what="DCP checkpoint metadata").load()
    except pickle.UnpicklingError as err:
        raise UnsafeFileError(f"refusing {path}: {err}; it was not unpickled. Only load checkpoints this engine "
                              "wrote") from None
    except Exception as err:  # noqa: BLE001 -- damaged data: whatever the unpickler or a metadata class raises
        raise ValueError(f"cannot read {path} ({type(err).__name__}: {err}); is the checkpoint complete?") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise ValueError(f"{path} does not hold DCP metadata")  # noqa: TRY004 (a user error)
    not_tensors = [key for key, md in metadata.state_dict_metadata.items() if isinstance(md, BytesStorageMetadata)]
    if not_tensors:
        raise UnsafeFileError(f"{path} lists non-tensor entries {not_tensors[:3]}; this engine writes tensors only "
                              "(the checkpoint was changed or written by other code)")
    for info in (metadata.storage_data or {}).values():
        if not isinstance(info, _StorageInfo):
            raise ValueError(f"{path}: storage entry {type(info).__name__} is not DCP's")  # noqa: TRY004
        if not isinstance(info.relative_path, str) or not _DCP_DATA_FILE.fullmatch(info.relative_path):
            raise UnsafeFileError(f"{path} names data file {info.relative_path!r}; a checkpoint's data files are "
                                  "__<rank>_<n>.distcp inside its own folder")
        if getattr(info, "transform_descriptors", None):
            raise UnsafeFileError(f"{path} asks for storage transforms {info.transform_descriptors!r}; this "
                                  "engine writes none")
        if not all(isinstance(v, int) and v >= 0 for v in (info.offset, info.length)):
            raise ValueError(f"{path}: bad offset/length for {info.relative_path}")
    return metadata


# ----- TorchScript archives as data -----

class _StorageType:
    """Stands for `torch.<X>Storage` in a TorchScript record: only its dtype is used."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


_STORAGE_TYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class ScriptedObject:
    """A TorchScript object's attributes, as data (its class is only a name; none of its code runs)."""

    qualified_name = ""

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Record:
    """A tensor record of the archive (`<root>/data/<key>`), read once."""

    def __init__(self, data: bytes, dtype: torch.dtype):
        self.tensor = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)


def _tensor_from_record(record: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                        hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    """A view of `record` (torch._utils._rebuild_tensor_v2's arguments), bounds checked."""
    ints = (offset, *size, *stride) if isinstance(size, tuple) and isinstance(stride, tuple) else None
    if not isinstance(record, _Record) or ints is None or not all(type(v) is int and v >= 0 for v in ints) \
            or len(size) != len(stride):
        raise pickle.UnpicklingError("malformed tensor record")
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0
    if extent > record.tensor.numel():
        raise pickle.UnpicklingError(f"tensor of size {size} reaches past its record ({record.tensor.numel()} items)")
    return torch.as_strided(record.tensor, size, stride, offset)


TORCHSCRIPT_GLOBALS: Mapping[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _tensor_from_record,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_TYPES.items()},
}


class _TorchScriptGlobals(dict):
    """TORCHSCRIPT_GLOBALS, plus a fresh `ScriptedObject` subclass for each `__torch__.*` class name."""

    def __missing__(self, key: tuple[str, str]) -> Any:
        module, name = key
        if not (module == "__torch__" or module.startswith("__torch__.")) or not name.isidentifier():
            raise KeyError(key)
        cls = type(name, (ScriptedObject,), {"qualified_name": f"{module}.{name}"})
        self[key] = cls
        return cls


_CLASS_HEADER = re.compile(r"^class (\w+)\(Module\):\s*$")
_NAME_LIST = re.compile(r"^\s+__(parameters|buffers)__ = \[(.*)\]\s*$")


def _module_tensor_names(archive: zipfile.ZipFile, root: str) -> dict[str, set[str]]:
    """{qualified class name: names of its parameters and buffers}, read from the archive's TorchScript
    source as text (the `__parameters__` / `__buffers__` lines TorchScript writes for each Module class)."""
    names: dict[str, set[str]] = {}
    prefix = f"{root}/code/"
    for member in archive.namelist():
        if not (member.startswith(prefix) and member.endswith(".py")):
            continue
        module = member[len(prefix):-len(".py")].replace("/", ".")
        current = None
        for line in archive.read(member).decode("utf-8", errors="replace").splitlines():
            header = _CLASS_HEADER.match(line)
            if header:
                current = names.setdefault(f"{module}.{header.group(1)}", set())
                continue
            listed = _NAME_LIST.match(line)
            if listed and current is not None:
                current.update(re.findall(r'"([^"\\]+)"', listed.group(2)))
    return names


def read_torchscript_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive (what `torch.jit.load(path).state_dict()` holds),
    read as data: `data.pkl` through an allow-list of tensor records, the parameter lists from its source
    text. No TorchScript is compiled or run."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"cannot read TorchScript archive {path} ({err})") from None
    with archive:
        roots = [name[:-len("/data.pkl")] for name in archive.namelist()
                 if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(roots) != 1:
            raise ValueError(f"{path} is not a TorchScript archive (no single <name>/data.pkl)")
        root = roots[0]
        members = set(archive.namelist())
        if f"{root}/byteorder" in members and archive.read(f"{root}/byteorder").strip() not in (b"", b"little"):
            raise ValueError(f"{path}: big-endian TorchScript archives are not supported")
        records: dict[str, _Record] = {}

        def persistent_load(pid: Any) -> _Record:
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                    and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and pid[2].isdigit()):
                raise pickle.UnpicklingError(f"unexpected persistent reference {str(pid)[:80]}")
            key = pid[2]
            if key not in records:
                member = f"{root}/data/{key}"
                if member not in members:
                    raise pickle.UnpicklingError(f"tensor record {member} is missing")
                if archive.getinfo(member).file_size % pid[1].dtype.itemsize:
                    raise pickle.UnpicklingError(f"tensor record {member} is not a whole number of items")
                records[key] = _Record(archive.read(member), pid[1].dtype)
            return records[key]

        try:
            root_object = RestrictedUnpickler(io.BytesIO(archive.read(f"{root}/data.pkl")),
                                              allowed=_TorchScriptGlobals(TORCHSCRIPT_GLOBALS),
                                              what="a TorchScript archive's data", persistent_load=persistent_load).load()
        except pickle.UnpicklingError as err:
            raise UnsafeFileError(f"refusing TorchScript archive {path}: {err}; nothing in it was run. Convert it "
                                  "where it is trusted (run.py convert) or pass .safetensors") from None
        except Exception as err:  # noqa: BLE001 -- damaged data, whatever the unpickler raises
            raise ValueError(f"cannot read TorchScript archive {path} ({type(err).__name__}: {err}); "
                             "is the file complete?") from None
        declared = _module_tensor_names(archive, root)
    state_dict: dict[str, torch.Tensor] = {}
    _collect_tensors(root_object, "", declared, state_dict, path, depth=0)
    if not state_dict:
        raise ValueError(f"TorchScript archive {path} holds no parameters or buffers")
    return state_dict


def _collect_tensors(obj: Any, prefix: str, declared: dict[str, set[str]], out: dict[str, torch.Tensor],
                     path: Path, *, depth: int) -> None:
    if depth > 64:
        raise ValueError(f"TorchScript archive {path}: modules nested deeper than 64")
    if not isinstance(obj, ScriptedObject) or not isinstance(getattr(obj, "state", None), dict):
        raise ValueError(  # noqa: TRY004 (a user error: the CLI reports ValueErrors)
            f"TorchScript archive {path}: module {prefix or '<root>'} has no plain attributes (a custom "
            "__getstate__); it cannot be read as data")
    names = declared.get(obj.qualified_name)
    if names is None:
        raise ValueError(f"TorchScript archive {path}: no source for class {obj.qualified_name}")
    for key, value in obj.state.items():
        if not isinstance(key, str):
            continue
        if key in names and isinstance(value, torch.Tensor):
            out[prefix + key] = value.clone()
        elif isinstance(value, ScriptedObject) and value.qualified_name in declared:
            _collect_tensors(value, f"{prefix}{key}.", declared, out, path, depth=depth + 1)
