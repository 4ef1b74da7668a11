"""Tests for lit_jax.convert.torch_reader: torch is used only to WRITE checkpoints here."""
import argparse
import collections
import os
import pickle
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from lit_jax.convert import CheckpointFormatError, UnsafeCheckpointError, extract_state_dict, read_pth
from lit_jax.convert.torch_reader import TorchDtype, UnknownObject

FORMATS = ["zip", "legacy"]


def save(obj, path, fmt):
    torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
    return path


def assert_same(arr, tensor):
    """Exact equality of a numpy array with a torch tensor (bitwise for the ml_dtypes types)."""
    assert isinstance(arr, np.ndarray), type(arr)
    assert arr.flags.c_contiguous
    assert tuple(arr.shape) == tuple(tensor.shape)
    tensor = tensor.detach().resolve_conj().resolve_neg()
    if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        expected_dtype = {torch.bfloat16: ml_dtypes.bfloat16, torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
                          torch.float8_e5m2: ml_dtypes.float8_e5m2}[tensor.dtype]
        assert arr.dtype == np.dtype(expected_dtype)
        bits, np_bits = (torch.int16, np.int16) if tensor.dtype == torch.bfloat16 else (torch.int8, np.int8)
        np.testing.assert_array_equal(arr.view(np_bits), tensor.contiguous().view(bits).numpy())
    elif tensor.dtype == torch.uint16:
        assert arr.dtype == np.uint16
        np.testing.assert_array_equal(arr, tensor.to(torch.int32).numpy().astype(np.uint16))
    else:
        expected = tensor.contiguous().numpy()
        assert arr.dtype == expected.dtype
        np.testing.assert_array_equal(arr, expected)


def make_state():
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(20, generator=g)
    st = collections.OrderedDict()
    st["f32"] = torch.randn(3, 4, generator=g)
    st["f16"] = torch.randn(5, generator=g).half()
    st["bf16"] = torch.randn(2, 3, generator=g).bfloat16()
    st["i64"] = torch.arange(-3, 4, dtype=torch.int64)
    st["boolean"] = torch.tensor([True, False, True])
    st["u8"] = torch.tensor([0, 7, 255], dtype=torch.uint8)
    st["f64"] = torch.randn(2, generator=g, dtype=torch.float64)
    st["transposed"] = torch.randn(3, 5, generator=g).t()  # non-contiguous view
    st["sliced_cols"] = torch.randn(4, 6, generator=g)[:, 1::2]  # offset + strides
    st["shared_a"] = shared[2:7]  # two tensors on one storage at different offsets
    st["shared_b"] = shared[10:20].view(2, 5)
    st["scalar"] = torch.tensor(3.25)  # 0-d
    st["empty"] = torch.zeros(0, 3)
    st["expanded"] = torch.arange(3.0).expand(4, 3)  # stride 0
    st["conj"] = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64).conj()  # lazily conjugated
    st["u16"] = torch.tensor([1, 2, 60000], dtype=torch.int32).to(torch.uint16)  # _rebuild_tensor_v3
    st["f8"] = torch.tensor([0.5, -1.0, 2.0]).to(torch.float8_e4m3fn)
    st["param"] = torch.nn.Parameter(torch.randn(2, 2, generator=g))
    return st


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_tensors(tmp_path, fmt):
    st = make_state()
    out = read_pth(save(st, tmp_path / "sd.pth", fmt))
    assert isinstance(out, dict) and list(out) == list(st)
    for k, t in st.items():
        assert_same(out[k], t)
    assert out["scalar"].shape == () and out["scalar"].ndim == 0
    assert out["empty"].shape == (0, 3)
    # results are independent writable copies, not views of one buffer
    out["shared_a"][0] = 1e9
    assert out["shared_b"][0, 0] != 1e9
    assert out["param"].flags.writeable


@pytest.mark.parametrize("fmt", FORMATS)
def test_module_state_dict_with_metadata_and_meta(tmp_path, fmt):
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3))
    sd = model.state_dict()  # OrderedDict with a _metadata attribute (pickle BUILD)
    meta = {
        "epoch": 12, "lr": 1e-4, "name": "lit_ti", "flag": True, "none": None,
        "classes": ("person", "car"), "sizes": [1, 2, 3], "nested": {"a": {"b": (1, "x", 2.5)}},
        "np_f64": np.float64(0.125), "np_i64": np.int64(-7), "np_f32": np.float32(1.5),
        "np_arr": np.arange(6, dtype=np.int32).reshape(2, 3), "shape": torch.Size([2, 3]),
        "tags": {"a", "b"}, "raw": b"\x00\xffbytes", "device": torch.device("cuda", 1),
        "dtype": torch.bfloat16,
    }
    out = read_pth(save({"state_dict": sd, "meta": meta}, tmp_path / "ck.pth", fmt))
    assert isinstance(out["state_dict"], collections.OrderedDict)
    assert list(out["state_dict"]) == list(sd)
    assert out["state_dict"]._metadata == sd._metadata
    for k, t in sd.items():
        assert_same(out["state_dict"][k], t)
    m = out["meta"]
    for key in ("epoch", "lr", "name", "flag", "none", "classes", "sizes", "nested", "tags", "raw"):
        assert m[key] == meta[key] and type(m[key]) is type(meta[key]), key
    for key in ("np_f64", "np_i64", "np_f32"):
        assert m[key] == meta[key] and m[key].dtype == meta[key].dtype, key
    np.testing.assert_array_equal(m["np_arr"], meta["np_arr"])
    assert m["np_arr"].dtype == np.int32
    assert m["shape"] == (2, 3) and type(m["shape"]) is tuple
    assert m["device"] == "cuda:1"
    assert isinstance(m["dtype"], TorchDtype) and m["dtype"].numpy == np.dtype(ml_dtypes.bfloat16)
    assert isinstance(out["state_dict"]["1.num_batches_tracked"], np.ndarray)


def test_matches_torch_load_weights_only(tmp_path):
    st = make_state()
    del st["u16"]
    path = save(st, tmp_path / "sd.pth", "zip")
    ref = torch.load(path, weights_only=True)
    out = read_pth(path)
    for k in st:
        assert_same(out[k], ref[k])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("nesting", ["bare", "state_dict", "model", "module_prefix"])
def test_extract_state_dict(tmp_path, fmt, nesting):
    st = collections.OrderedDict(w=torch.randn(2, 3), b=torch.zeros(3))
    if nesting == "bare":
        obj = st
    elif nesting == "state_dict":
        obj = {"meta": {"epoch": 1}, "state_dict": st, "optimizer": {"state": {}, "param_groups": []}}
    elif nesting == "model":
        obj = {"model": st, "epoch": 3, "args": [1, 2]}
    else:
        obj = {"model": collections.OrderedDict(("module." + k, v) for k, v in st.items())}
    path = save(obj, tmp_path / "ck.pth", fmt)
    flat = extract_state_dict(read_pth(path), path)
    assert list(flat) == ["w", "b"]
    for k in st:
        assert_same(flat[k], st[k])


def test_extract_state_dict_error_lists_keys(tmp_path):
    path = save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "ck.pth", "zip")
    with pytest.raises(ValueError) as info:
        extract_state_dict(read_pth(path), path)
    msg = str(info.value)
    assert str(path) in msg and "'epoch'" in msg and "'optimizer'" in msg


# ----------------------------------------------------------------------------------------------------
# unsafe content


class _SystemPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _raw_os_system_pickle(marker) -> bytes:
    # PROTO 2; GLOBAL 'os system'; SHORT_BINUNICODE cmd; TUPLE1; REDUCE; STOP
    cmd = f"touch {marker}".encode()
    return b"\x80\x02cos\nsystem\n\x8c" + bytes([len(cmd)]) + cmd + b"\x85R."


def _rewrite_zip(src, dst, edit):
    """Copy a torch zip checkpoint; edit(name, data) returns new bytes or None to drop the record."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
    return dst


def _legacy_stream(main_pickle: bytes) -> bytes:
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    return (pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
            + pickle.dumps(sys_info, protocol=2) + main_pickle + pickle.dumps([], protocol=2))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("placeholders", [False, True])
def test_reduce_payload_refused(tmp_path, fmt, placeholders):
    marker = tmp_path / "pwned"
    obj = {"state_dict": {"w": torch.ones(2)}, "meta": {"x": _SystemPayload(marker)}}
    path = save(obj, tmp_path / "evil.pth", fmt)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_pth(path, allow_unknown_as_placeholder=placeholders)
    assert str(path) in str(info.value) and "system" in str(info.value)
    assert isinstance(info.value, ValueError)
    assert not marker.exists()


@pytest.mark.parametrize("placeholders", [False, True])
def test_raw_opcode_payloads_refused(tmp_path, placeholders):
    marker = tmp_path / "pwned"
    good = save({"w": torch.ones(2)}, tmp_path / "good.pth", "zip")
    evil_zip = _rewrite_zip(good, tmp_path / "evil_zip.pth",
                            lambda n, d: _raw_os_system_pickle(marker) if n.endswith("/data.pkl") else d)
    evil_legacy = tmp_path / "evil_legacy.pth"
    evil_legacy.write_bytes(_legacy_stream(_raw_os_system_pickle(marker)))
    for path in (evil_zip, evil_legacy):
        with pytest.raises(UnsafeCheckpointError) as info:
            read_pth(path, allow_unknown_as_placeholder=placeholders)
        assert str(path) in str(info.value) and "os.system" in str(info.value)
    assert not marker.exists()

    # Python-2 spelled builtins, and attribute fetching through getattr
    for payload, name in [(b"\x80\x02c__builtin__\neval\nX\x04\x00\x00\x001+1q\x85R.", "builtins.eval"),
                          (b"\x80\x02c__builtin__\ngetattr\n.", "builtins.getattr")]:
        path = _rewrite_zip(good, tmp_path / "evil2.pth",
                            lambda n, d: payload if n.endswith("/data.pkl") else d)
        with pytest.raises(UnsafeCheckpointError, match=name.replace(".", r"\.")):
            read_pth(path)


def test_stand_ins_cannot_be_modified(tmp_path):
    good = save({"w": torch.ones(2)}, tmp_path / "good.pth", "zip")
    # GLOBAL torch._utils._rebuild_tensor_v2; EMPTY_DICT; BUILD -> tries to set state on the stand-in
    payload = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}b."
    path = _rewrite_zip(good, tmp_path / "evil.pth", lambda n, d: payload if n.endswith("/data.pkl") else d)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_pth(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_unknown_class_placeholder(tmp_path, fmt):
    args = argparse.Namespace(lr=0.1, name="lit")
    path = save({"model": {"w": torch.arange(3.0)}, "args": args}, tmp_path / "ck.pth", fmt)
    with pytest.raises(UnsafeCheckpointError, match=r"argparse\.Namespace") as info:
        read_pth(path)
    assert str(path) in str(info.value)
    out = read_pth(path, allow_unknown_as_placeholder=True)
    assert isinstance(out["args"], UnknownObject)
    assert out["args"].qualified_name == "argparse.Namespace"
    assert out["args"].state == {"lr": 0.1, "name": "lit"}
    np.testing.assert_array_equal(extract_state_dict(out, path)["w"], np.arange(3.0, dtype=np.float32))


# ----------------------------------------------------------------------------------------------------
# corrupt files


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_file(tmp_path, fmt):
    path = save({"w": torch.randn(64, 64)}, tmp_path / "ck.pth", fmt)
    data = path.read_bytes()
    for cut in (len(data) // 2, 40, len(data) - 3):
        bad = tmp_path / f"cut{cut}.pth"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointFormatError) as info:
            read_pth(bad)
        assert str(bad) in str(info.value)


def test_random_bytes_and_empty(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        bad = tmp_path / f"rand{i}.pth"
        bad.write_bytes(rng.integers(0, 256, size=4096, dtype=np.uint8).tobytes())
        with pytest.raises(CheckpointFormatError) as info:
            read_pth(bad)
        assert str(bad) in str(info.value)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match="empty"):
        read_pth(empty)
    text = tmp_path / "text.pth"
    text.write_bytes(pickle.dumps({"a": 1}, protocol=2))  # a pickle, but not a checkpoint
    with pytest.raises(CheckpointFormatError):
        read_pth(text)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_pth(tmp_path / "nope.pth")


def test_zip_missing_or_short_storage(tmp_path):
    path = save({"a": torch.arange(10.0), "b": torch.arange(4)}, tmp_path / "ck.pth", "zip")
    missing = _rewrite_zip(path, tmp_path / "missing.pth", lambda n, d: None if n.endswith("/data/0") else d)
    with pytest.raises(CheckpointFormatError, match="data/0") as info:
        read_pth(missing)
    assert str(missing) in str(info.value)
    short = _rewrite_zip(path, tmp_path / "short.pth", lambda n, d: d[:12] if n.endswith("/data/0") else d)
    with pytest.raises(CheckpointFormatError) as info:
        read_pth(short)
    assert str(short) in str(info.value)


def test_big_endian_zip(tmp_path):
    st = collections.OrderedDict(a=torch.randn(3, 2), b=torch.arange(5), c=torch.randn(4).bfloat16(),
                                 d=torch.tensor([1 + 2j], dtype=torch.complex64), e=torch.tensor([True]))
    path = save(st, tmp_path / "ck.pth", "zip")
    swap = {"0": 4, "1": 8, "2": 2, "3": 4, "4": 1}  # storage key -> byte-swap unit

    def edit(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        key = name.rsplit("/data/", 1)[-1] if "/data/" in name else None
        if key in swap and swap[key] > 1:
            return np.frombuffer(data, dtype=f"u{swap[key]}").byteswap().tobytes()
        return data

    out = read_pth(_rewrite_zip(path, tmp_path / "be.pth", edit))
    for k, t in st.items():
        assert_same(out[k], t)


def test_reader_needs_no_torch(tmp_path):
    path = save({"state_dict": make_state(), "meta": {"x": np.float32(2.0)}}, tmp_path / "ck.pth", "zip")
    legacy = save({"w": torch.ones(3)}, tmp_path / "ck_legacy.pth", "legacy")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (
        "import importlib.util, sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "spec = importlib.util.spec_from_file_location('torch_reader', "
        f"{os.path.join(root, 'lit_jax', 'convert', 'torch_reader.py')!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); read_pth = mod.read_pth\n"
        f"o = read_pth({str(path)!r}); assert o['state_dict']['f32'].shape == (3, 4)\n"
        f"o = read_pth({str(legacy)!r}); assert o['w'].tolist() == [1.0, 1.0, 1.0]\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env, timeout=120)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("protocol", [1, 4, 5])
def test_other_pickle_protocols(tmp_path, fmt, protocol):
    st = {"a": torch.randn(3, 2).t(), "meta": {"x": np.float32(2.0), "s": {1, 2}, "b": b"xy"}}
    path = tmp_path / "ck.pth"
    torch.save(st, path, pickle_protocol=protocol, _use_new_zipfile_serialization=(fmt == "zip"))
    out = read_pth(path)
    assert_same(out["a"], st["a"])
    assert out["meta"] == st["meta"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_stride0_view_beyond_the_file_is_refused(tmp_path, fmt):
    """A 4-byte storage expanded to 9000 x 9000 (324 MB from a ~1-2 KB file) is refused before allocating."""
    path = save({"state_dict": {"ok": torch.arange(3.0).expand(4, 3), "big": torch.tensor([1.5]).expand(9000, 9000)}},
                tmp_path / "bomb.pth", fmt)
    assert os.path.getsize(path) < 4096
    with pytest.raises(CheckpointFormatError) as err:
        read_pth(path)
    text = str(err.value)
    assert "key 'state_dict.big'" in text and "(9000, 9000)" in text and "stride (0, 0)" in text and "324000000 bytes" in text
    assert f"{os.path.getsize(path)}-byte file" in text
    small = read_pth(save({"ok": torch.arange(3.0).expand(400, 3)}, tmp_path / "ok.pth", fmt))  # legal, small
    assert small["ok"].shape == (400, 3) and (small["ok"][-1] == [0, 1, 2]).all()


def test_many_views_of_one_storage_count_against_one_budget(tmp_path, monkeypatch):
    """The budget is per file: views that each fit are refused once together they exceed it."""
    from lit_jax.convert import torch_reader
    monkeypatch.setattr(torch_reader, "_MATERIALISE_SLACK_BYTES", 0)
    base = torch.randn(1000)
    path = save({f"v{i}": base[:] for i in range(2)}, tmp_path / "two.pth", "zip")
    assert len(read_pth(path)) == 2  # 8 KB of tensors from a file plus storage of ~9 KB: fine
    path = save({f"v{i}": base[:] for i in range(40)}, tmp_path / "many.pth", "zip")
    with pytest.raises(CheckpointFormatError, match=r"key 'v\d+'.*storage '0'"):
        read_pth(path)
