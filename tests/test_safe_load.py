"""Every pickle-based reader (engine/safe_load.py) against an attacker: payloads built here from opcodes,
dotted names, path traversal, TorchScript code; the allow-lists enumerated; random pickles of protocols 0-5.

The CLI routes (export, eval, tune --weights / --resume / --osr-from, resume on another world size, model
folders) are aimed at in tests/test_security_cli.py."""

import collections
import enum
import io
import os
import pickle
import random
import struct
import types
import zipfile

import pytest
import torch
import torch.distributed.checkpoint as dcp

from engine.safe_load import (
    DCP_METADATA_GLOBALS,
    TORCHSCRIPT_GLOBALS,
    ScriptedObject,
    UnsafeFileError,
    deepspeed_globals,
    load_tensor_file,
    read_dcp_metadata,
    read_torchscript_state_dict,
    tensor_only_torch_load,
)
from tests.helpers.planted import Planted

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


# ----- payloads from opcodes -----

def _str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def global_call(module: str, name: str, arg: str, *, protocol: int) -> bytes:
    """Opcodes that resolve `module`/`name` and call it with `arg` (GLOBAL below protocol 4, STACK_GLOBAL from 4:
    the form in which a dotted name reaches find_class)."""
    if protocol >= 4:
        resolve = _str(module) + _str(name) + b"\x93"  # STACK_GLOBAL
    else:
        resolve = b"c" + module.encode() + b"\n" + name.encode() + b"\n"  # GLOBAL
    return resolve + _str(arg) + b"\x85R"  # TUPLE1, REDUCE


def shell_payload(module: str, marker, *, protocol: int = 4) -> bytes:
    """`module`.os.system('touch marker'), as a whole pickle."""
    return b"\x80" + bytes([max(protocol, 2)]) + global_call(module, "os.system", f"touch {marker}",
                                                             protocol=protocol) + b"."


def prepended(payload: bytes, genuine: bytes) -> bytes:
    """`payload`'s call, its result popped, then the genuine pickle: unpickles to the genuine value."""
    return payload[:-1] + b"0" + genuine  # drop STOP, POP


def _dcp_folder(path):
    dcp.save({"w": torch.arange(6.0).reshape(2, 3)}, checkpoint_id=path)
    return path


# ----- DCP metadata -----

@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_dotted_name_in_dcp_metadata_never_runs(tmp_path, protocol):
    folder = _dcp_folder(tmp_path / "ckpt")
    marker = tmp_path / "ran"
    genuine = (folder / ".metadata").read_bytes()
    for module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"):
        # Whole and prepended to the real metadata (which would then load normally).
        for data in (shell_payload(module, marker, protocol=protocol),
                     prepended(shell_payload(module, marker, protocol=protocol), genuine)):
            (folder / ".metadata").write_bytes(data)
            with pytest.raises(UnsafeFileError, match="os.system is not allowed"):
                read_dcp_metadata(folder / ".metadata")
    assert not marker.exists()
    # The mechanism the payload relies on is real: a plain unpickler runs it.
    pickle.loads(shell_payload("torch.distributed.checkpoint.metadata", marker))
    assert marker.exists()


def test_dcp_data_files_stay_inside_the_checkpoint(tmp_path):
    folder = _dcp_folder(tmp_path / "ckpt")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"x" * 64)
    metadata = read_dcp_metadata(folder / ".metadata")
    for bad in ("../secret.bin", str(secret), "sub/__0_0.distcp", ".metadata"):
        for info in metadata.storage_data.values():
            info.relative_path = bad
        (folder / ".metadata").write_bytes(pickle.dumps(metadata))
        with pytest.raises(UnsafeFileError, match="names data file"):
            read_dcp_metadata(folder / ".metadata")
    for info in metadata.storage_data.values():
        info.relative_path, info.transform_descriptors = "__0_0.distcp", ["zstd"]
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeFileError, match="storage transforms"):
        read_dcp_metadata(folder / ".metadata")


# ----- torch.load (weights_only) and DeepSpeed's loads -----

@pytest.mark.parametrize("protocol", [2, 4])
def test_torch_load_files_refuse_dotted_and_foreign_globals(tmp_path, protocol):
    marker = tmp_path / "ran"
    path = tmp_path / "w.pt"
    torch.save({"w": torch.ones(2)}, path)
    for module in ("deepspeed.runtime.fp16.loss_scaler", "torch._utils", "collections"):
        _replace_data_pkl(path, shell_payload(module, marker, protocol=protocol))
        with pytest.raises(UnsafeFileError, match="needs more than tensors"):
            load_tensor_file(path, extra_globals=deepspeed_globals())
    assert not marker.exists()


def _replace_data_pkl(path, data: bytes) -> None:
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, data if name.endswith("/data.pkl") else content)


def test_deepspeed_own_loads_are_forced_weights_only(tmp_path):
    """DeepSpeed's code calls torch.load(weights_only=False); inside the guard that call cannot unpickle code."""
    marker = tmp_path / "ran"
    path = tmp_path / "optim_states.pt"
    torch.save({"state": Planted(marker)}, path)
    with tensor_only_torch_load(deepspeed_globals()), pytest.raises(UnsafeFileError):
        torch.load(path, map_location="cpu", weights_only=False)
    assert not marker.exists()
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(3), "step": 4}, plain)
    with tensor_only_torch_load(deepspeed_globals()):
        assert torch.load(plain, weights_only=False)["step"] == 4
    torch.load(path, weights_only=False)  # outside the guard: torch.load itself again (and the payload is real)
    assert marker.exists()


def test_overlapping_guards_give_torch_load_back_when_the_last_closes():
    """Guards opened and closed out of order (two threads' loads): guarded while any is open, torch's after."""
    original = torch.load
    first, second = tensor_only_torch_load(deepspeed_globals()), tensor_only_torch_load()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert torch.load is not original  # the second is still open
    second.__exit__(None, None, None)
    assert torch.load is original


@pytest.mark.parametrize("content", [b"", b"\x80\x04K\x01.", b"PK\x03\x04garbage"])
def test_damaged_tensor_files_are_one_value_error(tmp_path, content):
    path = tmp_path / "w.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=str(path)):
        load_tensor_file(path)


# ----- TorchScript archives as data -----

class _Blocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)])
        self.register_buffer("scale", torch.tensor([2.0]))
        self.register_buffer("mask", torch.triu(torch.ones(3, 3)), persistent=False)
        self.plain = torch.ones(1)  # a tensor attribute: neither parameter nor buffer
        self.logit = torch.nn.Parameter(torch.tensor(1.5))
        self.halves = torch.nn.Parameter(torch.randn(2, 5).half().t())  # fp16, not contiguous

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x * self.scale + self.plain + self.logit + self.mask.sum() + self.halves.float().sum()


@pytest.mark.parametrize("kind", ["script", "trace"])
def test_torchscript_state_dict_equals_jit_load(tmp_path, kind):
    torch.manual_seed(0)
    module = _Blocks()
    scripted = torch.jit.script(module) if kind == "script" else torch.jit.trace(module, torch.zeros(2, 3))
    scripted.save(str(tmp_path / "m.pt"))
    reference = torch.jit.load(str(tmp_path / "m.pt")).state_dict()  # the test's own file: a reference only
    ours = read_torchscript_state_dict(tmp_path / "m.pt")
    assert ours.keys() == reference.keys() and "plain" not in ours
    for key, value in reference.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


def _evil_module_class():
    class Evil(torch.nn.Module):
        """`torch.jit.load` runs its scripted __setstate__, which writes bytes into the file the archive names."""

        def __init__(self, target: str):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(2))
            self.target = target

        def forward(self, x):
            return x * self.weight

        @torch.jit.export
        def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
            return (self.weight, self.target, self.training)

        @torch.jit.export
        def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
            self.weight = state[0]
            self.target = state[1]
            written = torch.from_file(state[1], shared=True, size=8, dtype=torch.uint8).fill_(65)
            self.training = state[2] and int(written.sum()) > 0

    return Evil


def evil_torchscript(path, victim) -> None:
    """A TorchScript archive whose loading overwrites `victim`'s first 8 bytes with 'A'."""
    torch.jit.script(_evil_module_class()(str(victim))).save(str(path))


def test_torchscript_setstate_never_runs(tmp_path):
    victim = tmp_path / "victim.bin"
    victim.write_bytes(bytes(8))
    evil_torchscript(tmp_path / "evil.pt", victim)
    with pytest.raises(ValueError, match="custom __getstate__"):
        read_torchscript_state_dict(tmp_path / "evil.pt")
    assert victim.read_bytes() == bytes(8)
    torch.jit.load(str(tmp_path / "evil.pt"))  # the payload is real: TorchScript runs it
    assert victim.read_bytes() == b"A" * 8


def test_torchscript_records_are_bounds_checked_and_globals_exact(tmp_path):
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "m.pt"))
    with zipfile.ZipFile(tmp_path / "m.pt") as archive:
        data = archive.read("m/data.pkl")
    # A tensor claiming more items than its record holds.
    grown = data.replace(b"(K\x02K\x02t", b"(M\x00\x01K\x02t", 1)  # size (2, 2) -> (256, 2)
    assert grown != data
    _replace_data_pkl(tmp_path / "m.pt", grown)
    with pytest.raises(UnsafeFileError, match="reaches past its record"):
        read_torchscript_state_dict(tmp_path / "m.pt")
    marker = tmp_path / "ran"
    for module in ("torch._utils", "collections", "__torch__"):
        _replace_data_pkl(tmp_path / "m.pt", shell_payload(module, marker, protocol=2))
        with pytest.raises(UnsafeFileError, match="not allowed"):
            read_torchscript_state_dict(tmp_path / "m.pt")
    assert not marker.exists()


# ----- the allow-lists, enumerated -----

DANGEROUS_NAMES = {"os", "subprocess", "system", "popen", "eval", "exec", "compile", "open", "__import__",
                   "import_module", "getattr", "setattr", "globals", "locals", "from_file", "save", "load",
                   "write", "write_bytes", "write_text", "remove", "unlink", "rmtree", "spawn", "fork", "run",
                   "call", "loads", "marshal", "builtins", "sys", "shutil", "importlib", "ctypes"}
# Methods the unpickler may call on an allowed class: construction (REDUCE / NEWOBJ), BUILD, SETITEMS / APPENDS.
UNPICKLING_METHODS = ("__new__", "__init__", "__post_init__", "__setstate__", "__setitem__", "append", "extend",
                      "__missing__", "_missing_")
SAFE_BUILTIN_TYPES = (collections.OrderedDict, torch.Size)


def _names_in_code(code: types.CodeType) -> set[str]:
    names = set(code.co_names) | set(code.co_varnames)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names_in_code(const)
    return names


def _callable_reaches_danger(func, seen: set) -> set[str]:
    """Dangerous names the Python code of `func` (and the module functions it calls) refers to."""
    func = getattr(func, "__func__", func)
    code = getattr(func, "__code__", None)
    if code is None or id(code) in seen:
        return set()
    seen.add(id(code))
    names = _names_in_code(code)
    found = names & DANGEROUS_NAMES
    for name in names:  # follow the module-level functions it calls, one module deep at a time
        callee = getattr(func, "__globals__", {}).get(name)
        if isinstance(callee, types.ModuleType) and callee.__name__.split(".")[0] in DANGEROUS_NAMES:
            found.add(callee.__name__)
        elif isinstance(callee, types.FunctionType):
            found |= _callable_reaches_danger(callee, seen)
    return found


def _what_unpickling_may_call(value) -> list:
    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
        return []  # values: not callable
    if not isinstance(value, type):
        if callable(value):
            return [value]
        return []  # TorchScript's storage stand-ins: data holding a dtype
    if value in SAFE_BUILTIN_TYPES or issubclass(value, enum.Enum) and value.__module__.startswith("torch"):
        return [getattr(value, "_missing_", None)] if issubclass(value, enum.Enum) else []
    methods = []
    for name in UNPICKLING_METHODS:
        for klass in value.__mro__:
            if klass is object or klass.__module__ == "builtins":
                continue
            if name in vars(klass):
                methods.append(vars(klass)[name])
    return methods


def _all_allowed() -> dict:
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = {**DCP_METADATA_GLOBALS, **TORCHSCRIPT_GLOBALS}
    allowed.update({(cls.__module__, cls.__qualname__): cls for cls in deepspeed_globals()})
    # A `__torch__.*` class of a TorchScript archive is a fresh ScriptedObject subclass.
    allowed[("__torch__", "Any")] = type("Any", (ScriptedObject,), {})
    return allowed, _get_allowed_globals()


def test_every_allowed_global_is_plain_data_or_a_tensor_builder():
    ours, torchs = _all_allowed()
    assert len(ours) > 20
    for (module, name), value in ours.items():
        assert "." not in name, (module, name)
        assert value is not os.system and not isinstance(value, types.ModuleType), (module, name)
        for method in _what_unpickling_may_call(value):
            if method is None:
                continue
            reached = _callable_reaches_danger(method, set())
            assert not reached, f"{module}.{name} may reach {sorted(reached)} when unpickled"
    # DeepSpeed's files go through torch's own weights_only list: it holds no module and nothing named above.
    for full_name, value in torchs.items():
        assert not isinstance(value, types.ModuleType), full_name
        assert full_name.rsplit(".", 1)[-1] not in DANGEROUS_NAMES, full_name


def test_the_enumeration_catches_a_dangerous_global():
    """The check above can fail: a class whose __setstate__ writes a file, or a function calling os.system."""

    class Writes:
        def __setstate__(self, state):
            with open(state, "w") as fh:
                fh.write("x")

    def runs(command):
        return os.system(command)

    assert _callable_reaches_danger(_what_unpickling_may_call(Writes)[0], set()) >= {"open", "write"}
    assert "os" in _callable_reaches_danger(runs, set())


# ----- property: random pickles resolve nothing outside the allow-lists -----

def _attribute_chains(module_name: str, rng: random.Random, count: int) -> list[str]:
    import importlib

    module = importlib.import_module(module_name)
    names = sorted(n for n in dir(module) if not n.startswith("__"))
    chains = []
    for _ in range(count):
        first = rng.choice(names)
        chain = [first]
        value = getattr(module, first, None)
        for _ in range(rng.randint(0, 2)):  # dotted names: attributes of attributes (os.system, ...)
            inner = sorted(n for n in dir(value) if not n.startswith("__")) if value is not None else []
            if not inner:
                break
            chain.append(rng.choice(inner))
            value = getattr(value, chain[-1], None)
        chains.append(".".join(chain))
    return [*chains, "os.system", "subprocess.Popen", "builtins.eval", "torch.load", "__class__.__init__"]


def _random_pickle(rng: random.Random, module: str, name: str, protocol: int) -> bytes:
    body = global_call(module, name, "x", protocol=protocol) if rng.random() < 0.5 else (
        (_str(module) + _str(name) + b"\x93") if protocol >= 4 else b"c" + module.encode() + b"\n" + name.encode()
        + b"\n")
    prefix = b"" if protocol == 0 else b"\x80" + bytes([max(protocol, 2)])
    return prefix + body + b"."


def _readers(tmp_path):
    weights = tmp_path / "w.pt"
    torch.save({"w": torch.ones(1)}, weights)

    def dcp_reader(data):
        (tmp_path / ".metadata").write_bytes(data)
        return read_dcp_metadata(tmp_path / ".metadata")

    def torch_reader(data):
        _replace_data_pkl(weights, data)
        return load_tensor_file(weights, extra_globals=deepspeed_globals())

    def torchscript_unpickler(data):
        from engine.safe_load import RestrictedUnpickler, _TorchScriptGlobals

        return RestrictedUnpickler(io.BytesIO(data), allowed=_TorchScriptGlobals(TORCHSCRIPT_GLOBALS),
                                   what="test").load()

    return {"dcp": dcp_reader, "torch": torch_reader, "torchscript": torchscript_unpickler}


def test_random_pickles_resolve_nothing_outside_the_allow_lists(tmp_path):
    """Random protocol 0-5 pickles naming attribute chains of every module the allow-lists draw from: each
    either fails or yields only an allowed object (or plain data built from one)."""
    rng = random.Random(0)
    ours, torchs = _all_allowed()
    allowed_ids = {id(v) for v in ours.values()} | {id(v) for v in torchs.values()}
    modules = sorted({module for module, _ in ours if not module.startswith("__torch__")}
                     | {"deepspeed.runtime.fp16.loss_scaler", "deepspeed.utils.tensor_fragment"})
    allowed_types = (ScriptedObject, torch.dtype, enum.Enum,
                     *(v for v in [*ours.values(), *torchs.values()] if isinstance(v, type)))
    readers = _readers(tmp_path)
    marker = tmp_path / "ran"
    resolved = 0
    for module in modules:
        for name in _attribute_chains(module, rng, 12):
            for protocol in range(6):
                data = _random_pickle(rng, module, name, protocol)
                for reader_name, reader in readers.items():
                    try:
                        value = reader(data)
                    except (ValueError, pickle.UnpicklingError, TypeError, AttributeError, KeyError, IndexError,
                            EOFError, RuntimeError, NotImplementedError, struct.error):
                        continue
                    resolved += 1
                    ok = id(value) in allowed_ids or isinstance(value, allowed_types)
                    assert ok, (reader_name, module, name, protocol, value)
    assert not marker.exists()
    assert resolved > 0  # some allowed names were drawn and resolved: the readers were exercised
