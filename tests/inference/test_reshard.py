"""The expert split: every field and tensor kept, expert tensors cut into slices that add up to the source."""

from __future__ import annotations

import os
import re

import gguf
import numpy as np
import pytest

from inference import cli, reshard, synth
from inference.reshard import ReshardError

Q8_0, F16 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16
# Numpy axis of the expert FFN dimension: ne[1] of gate/up, ne[0] (innermost) of down.
FFN_AXIS = {"gate": 1, "up": 1, "down": 2}
CASES = [(quant, shards) for quant in synth.QUANTS for shards in (2, 4)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    out = tmp_path_factory.mktemp("sources")
    return {
        quant: synth.synth_model("tiny", quant, out / f"tiny-{quant}.gguf", seed=7).path
        for quant in synth.QUANTS
    }


@pytest.fixture(scope="module")
def resharded(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("resharded")
    return {
        (quant, shards): reshard.reshard(sources[quant], out / f"tiny-{quant}-x{shards}.gguf", shards)
        for quant, shards in CASES
    }


def raw_field(field) -> bytes:
    """The field as stored in the file: key, type and value."""
    return b"".join(part.tobytes() for part in field.parts)


def values(tensor) -> np.ndarray:
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type)


def expert_name(layer: int, kind: str) -> str:
    return f"blk.{layer}.ffn_{kind}_exps.weight"


def expected_names(source: gguf.GGUFReader, shards: int) -> list[str]:
    names = []
    for t in source.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight", t.name)
        if m:
            names += [reshard.shard_tensor_name(int(m.group(1)), m.group(2), k) for k in range(shards)]
        else:
            names.append(t.name)
    return names


def assert_fields_kept(source: gguf.GGUFReader, out: gguf.GGUFReader, arch: str, shards: int) -> None:
    header = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    src = {k: raw_field(f) for k, f in source.fields.items() if k not in header}
    got = {k: raw_field(f) for k, f in out.fields.items() if k not in header}
    key = f"{arch}.expert_shard_count"
    assert got.keys() == src.keys() | {key}
    for k, raw in src.items():
        assert got[k] == raw, k
    assert out.fields[key].types == [gguf.GGUFValueType.UINT32]
    assert out.fields[key].contents() == shards


def assert_layout(path, out: gguf.GGUFReader) -> None:
    """Tensor data aligned as the file says, and the file ends where the last tensor's padding does."""
    alignment = int(out.alignment)  # a numpy uint32 when the file sets general.alignment
    for t in out.tensors:
        assert t.data_offset % alignment == 0, t.name
    last = max(out.tensors, key=lambda t: t.data_offset)
    end = last.data_offset + last.n_bytes
    assert os.path.getsize(path) == end + (-end) % alignment


@pytest.mark.parametrize(("quant", "shards"), CASES)
def test_fields_and_other_tensors_are_kept_byte_for_byte(sources, resharded, quant, shards):
    result = resharded[quant, shards]
    source, out = gguf.GGUFReader(sources[quant]), gguf.GGUFReader(result.path)
    assert_fields_kept(source, out, "qwen3moe", shards)
    # the vocabulary arrays, the part easiest to get wrong, decode to the same tokens
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
        assert out.fields[key].contents() == source.fields[key].contents()
    assert [t.name for t in out.tensors] == expected_names(source, shards)
    assert result.n_tensors == len(out.tensors) == len(source.tensors) + 3 * 4 * (shards - 1)
    by_name = {t.name: t for t in out.tensors}
    for t in source.tensors:
        if "_exps" in t.name:
            continue
        got = by_name[t.name]
        assert (got.tensor_type, got.shape.tolist()) == (t.tensor_type, t.shape.tolist()), t.name
        assert got.data.tobytes() == t.data.tobytes(), t.name
    assert_layout(result.path, out)


@pytest.mark.parametrize(("quant", "shards"), CASES)
def test_slices_put_together_are_the_source_experts(sources, resharded, quant, shards):
    result = resharded[quant, shards]
    source, out = gguf.GGUFReader(sources[quant]), gguf.GGUFReader(result.path)
    src = {t.name: t for t in source.tensors}
    got = {t.name: t for t in out.tensors}
    n_ff, width = 256, 256 // shards
    requantized = {}
    for layer in range(4):
        for kind in ("gate", "up", "down"):
            whole = src[expert_name(layer, kind)]
            slices = [got[reshard.shard_tensor_name(layer, kind, k)] for k in range(shards)]
            ne = [256, width, 4] if kind != "down" else [width, 256, 4]
            assert all(s.shape.tolist() == ne for s in slices)
            if kind != "down" or quant != "q4_k":
                # a byte copy: same type, and the raw rows are the source's, so the values are exact
                assert all(s.tensor_type == whole.tensor_type for s in slices)
                joined = np.concatenate([values(s) for s in slices], axis=FFN_AXIS[kind])
                np.testing.assert_array_equal(joined, values(whole))
                continue
            # Q4_K/Q6_K blocks are 256 values; a slice of 128 or 64 is requantized to Q8_0
            assert all(s.tensor_type == Q8_0 for s in slices)
            requantized[whole.name] = (whole.tensor_type.name, "Q8_0")
            expected = values(whole)
            joined = np.concatenate([values(s) for s in slices], axis=2)
            assert joined.shape == expected.shape == (4, 256, n_ff)
            # Q8_0: scale d = max|x|/127 per 32-value block, values rounded to the nearest multiple of d
            # (error <= d/2), then d stored as f16 (relative error <= 2**-11, times |q| <= 127).
            blocks = np.abs(expected).reshape(4, 256, n_ff // 32, 32)
            bound = blocks.max(axis=-1, keepdims=True) * (1 / 254 + 2**-11) * (1 + 1e-5)
            error = np.abs(joined - expected).reshape(blocks.shape)
            assert (error <= bound).all(), float((error - bound).max())
            assert error.max() > 0  # really requantized, not copied
    assert {r.tensor: (r.source_type, r.new_type) for r in result.requantized} == requantized
    if quant == "q4_k":
        assert len(requantized) == 4


def test_slices_not_a_multiple_of_32_are_written_as_f16(sources, tmp_path):
    result = reshard.reshard(sources["q8_0"], tmp_path / "x16.gguf", 16)  # 256 / 16 = 16 values per slice
    assert [(r.source_type, r.new_type) for r in result.requantized] == [("Q8_0", "F16")] * 4
    source, out = gguf.GGUFReader(sources["q8_0"]), gguf.GGUFReader(result.path)
    got = {t.name: t for t in out.tensors}
    for layer in range(4):
        expected = values(next(t for t in source.tensors if t.name == expert_name(layer, "down")))
        slices = [got[reshard.shard_tensor_name(layer, "down", k)] for k in range(16)]
        assert all(s.tensor_type == F16 and s.shape.tolist() == [16, 256, 4] for s in slices)
        joined = np.concatenate([values(s) for s in slices], axis=2)
        # f16 rounding: half a unit in the last place, 2**-11 relative (2**-25 absolute below the normals)
        assert (np.abs(joined - expected) <= np.abs(expected) * 2**-11 + 2**-25).all()
        gate = np.concatenate(
            [values(got[reshard.shard_tensor_name(layer, "gate", k)]) for k in range(16)], axis=1
        )
        np.testing.assert_array_equal(
            gate, values(next(t for t in source.tensors if t.name == expert_name(layer, "gate")))
        )


def write_crafted(path, *, experts: bool = True) -> dict[str, np.ndarray]:
    """A small MoE GGUF of another architecture: every KV type, 64-byte alignment, F32 and F16 experts."""
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(path, "testmoe")
    w.add_custom_alignment(64)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1 / 3)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "naïve café 中文 🦙")
    w.add_key_value(
        "t.strs", ["a", "", "ü\n", "<|im_end|>"], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING
    )
    w.add_key_value("t.u8s", [0, 255, 7], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT8)
    w.add_key_value("t.i64s", [-1, 2**40], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT64)
    w.add_key_value("t.f32s", [0.5, -1e-30, 3.25], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32)
    w.add_key_value("t.bools", [True, False], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL)
    # 50 * 27 * 4 = 5400 bytes: the next tensor starts at 5440 with 64-byte alignment, at 5408 with 32
    tensors = {"token_embd.weight": rng.standard_normal((50, 27), dtype=np.float32)}
    for layer in range(2):
        dtype = np.float32 if layer == 0 else np.float16
        tensors[f"blk.{layer}.attn_norm.weight"] = np.ones(32, dtype=np.float32)
        if experts:
            tensors[expert_name(layer, "gate")] = rng.standard_normal((3, 64, 32)).astype(dtype)
            tensors[expert_name(layer, "down")] = rng.standard_normal((3, 32, 64)).astype(dtype)
            tensors[expert_name(layer, "up")] = rng.standard_normal((3, 64, 32)).astype(dtype)
        tensors[f"blk.{layer}.ffn_gate_inp.weight"] = rng.standard_normal((3, 32), dtype=np.float32)
    for name, data in tensors.items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def test_any_architecture_field_types_alignment_and_float_experts(tmp_path):
    tensors = write_crafted(tmp_path / "crafted.gguf")
    result = reshard.reshard(tmp_path / "crafted.gguf", tmp_path / "out.gguf", 4)
    assert result.requantized == ()
    source, out = gguf.GGUFReader(tmp_path / "crafted.gguf"), gguf.GGUFReader(result.path)
    assert_fields_kept(source, out, "testmoe", 4)
    assert out.alignment == 64 and out.fields["general.alignment"].contents() == 64
    assert_layout(result.path, out)
    assert [t.name for t in out.tensors] == expected_names(source, 4)
    got = {t.name: t for t in out.tensors}
    for layer in range(2):
        for kind in ("gate", "up", "down"):
            whole = tensors[expert_name(layer, kind)]
            for k in range(4):
                s = got[reshard.shard_tensor_name(layer, kind, k)]
                assert s.data.dtype == whole.dtype
                part = (
                    whole[:, 16 * k : 16 * (k + 1), :]
                    if kind != "down"
                    else whole[:, :, 16 * k : 16 * (k + 1)]
                )
                np.testing.assert_array_equal(s.data, part)


def test_refuses_a_width_that_does_not_divide(sources, tmp_path):
    with pytest.raises(
        ReshardError, match=r"tiny-q8_0\.gguf.*256.*3 equal slices.*divides 256 \(2, 4, 8, 16"
    ):
        reshard.reshard(sources["q8_0"], tmp_path / "x3.gguf", 3)
    assert list(tmp_path.iterdir()) == []


def test_refuses_fewer_than_two_slices(sources, tmp_path):
    for shards in (1, 0):
        with pytest.raises(ReshardError, match=r"tiny-q8_0\.gguf.*at least 2 RPC workers.*--split layer"):
            reshard.reshard(sources["q8_0"], tmp_path / "x1.gguf", shards)


def test_refuses_a_model_already_split(resharded, tmp_path):
    done = resharded["q4_0", 2].path
    with pytest.raises(ReshardError, match=rf"{re.escape(done.name)} is already an expert split.*original"):
        reshard.reshard(done, tmp_path / "again.gguf", 2)


def test_refuses_a_model_without_experts(tmp_path):
    write_crafted(tmp_path / "dense.gguf", experts=False)
    with pytest.raises(ReshardError, match=r"dense\.gguf has no expert tensors.*--split layer"):
        reshard.reshard(tmp_path / "dense.gguf", tmp_path / "out.gguf", 2)


def test_refuses_a_file_that_is_not_gguf(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"not a model at all")
    with pytest.raises(ReshardError, match=r"junk\.gguf is not a readable GGUF"):
        reshard.reshard(tmp_path / "junk.gguf", tmp_path / "out.gguf", 2)


def test_cache_is_keyed_by_digest_and_count_and_reused_without_rehashing(sources, tmp_path, monkeypatch):
    src, cache = sources["q4_0"], tmp_path / "cache"
    hashed = []
    real_hash = reshard.file_sha256
    monkeypatch.setattr(reshard, "file_sha256", lambda p, progress=None: hashed.append(p) or real_hash(p))
    lines: list[str] = []
    first = reshard.ensure_sharded(src, 2, cache, lines.append)
    digest = real_hash(src)
    assert first == cache / f"tiny-q4_0-{digest[:16]}-experts2-v{reshard.FORMAT_VERSION}.gguf"
    assert first.is_file() and len(hashed) == 1
    assert any(line.startswith("wrote ") for line in lines)
    assert gguf.GGUFReader(first).fields["qwen3moe.expert_shard_count"].contents() == 2
    stamp = first.stat().st_mtime_ns

    def fail(*_args, **_kw):
        raise AssertionError("the cached split was hashed or written again")

    monkeypatch.setattr(reshard, "file_sha256", fail)
    monkeypatch.setattr(reshard, "_open", fail)  # not even parsed: a 151936-token vocabulary takes seconds
    monkeypatch.setattr(reshard, "_write", fail)
    lines.clear()
    assert reshard.ensure_sharded(src, 2, cache, lines.append) == first
    assert lines == [f"reusing {first}"]
    assert first.stat().st_mtime_ns == stamp
    assert reshard.sharded_path(src, 2, cache) == first

    monkeypatch.undo()
    monkeypatch.setattr(reshard, "file_sha256", fail)  # the sidecar still knows the digest
    other = reshard.ensure_sharded(src, 4, cache)
    assert other != first and "experts4" in other.name
    assert gguf.GGUFReader(other).fields["qwen3moe.expert_shard_count"].contents() == 4
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.name, other.name, "digests.json"])


def test_partial_files_of_dead_writers_are_removed(sources, tmp_path):
    cache = tmp_path / "cache"
    target = reshard.sharded_path(sources["q4_0"], 2, cache)
    dead = cache / f".{target.name}.999999999.0000.partial"  # beyond any pid_max
    alive = cache / f".{target.name}.{os.getpid()}.0000.partial"
    dead.write_bytes(b"half a model")
    alive.write_bytes(b"being written")
    assert reshard.ensure_sharded(sources["q4_0"], 2, cache) == target
    assert not dead.exists() and alive.exists()


def test_a_changed_source_is_hashed_again(sources, tmp_path, monkeypatch):
    src = tmp_path / "model.gguf"
    src.write_bytes(sources["q8_0"].read_bytes())
    cache = tmp_path / "cache"
    hashed = []
    real_hash = reshard.file_sha256
    monkeypatch.setattr(reshard, "file_sha256", lambda p, progress=None: hashed.append(p) or real_hash(p))
    first = reshard.sharded_path(src, 2, cache)
    assert reshard.sharded_path(src, 2, cache) == first and len(hashed) == 1
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert reshard.sharded_path(src, 2, cache) == first  # same bytes, same digest
    assert len(hashed) == 2
    with src.open("r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x01")
    assert reshard.sharded_path(src, 2, cache) != first
    assert len(hashed) == 3


def test_ensure_sharded_checks_the_model_before_hashing(sources, tmp_path, monkeypatch):
    def fail(*_args, **_kw):
        raise AssertionError("hashed a model that cannot be split")

    monkeypatch.setattr(reshard, "file_sha256", fail)
    with pytest.raises(ReshardError, match="3 equal slices"):
        reshard.ensure_sharded(sources["q8_0"], 3, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_command_prints_progress_and_the_path(sources, tmp_path, capsys):
    src = str(sources["q8_0"])
    assert cli.main(["reshard", "--model", src, "--workers", "2", "--cache-dir", str(tmp_path / "c")]) == 0
    captured = capsys.readouterr()
    path = captured.out.strip()
    assert captured.out == path + "\n" and path.startswith(str(tmp_path / "c")) and os.path.isfile(path)
    assert "100.0%" in captured.err and "wrote " in captured.err

    assert cli.main(["reshard", "--model", src, "--workers", "4", "--out", str(tmp_path / "o.gguf")]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'o.gguf'}\n"
    assert gguf.GGUFReader(tmp_path / "o.gguf").fields["qwen3moe.expert_shard_count"].contents() == 4

    assert cli.main(["reshard", "--model", src, "--workers", "3", "--out", str(tmp_path / "x.gguf")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("reshard: error: model ")
    assert not (tmp_path / "x.gguf").exists()
