"""Expert split: a copy of a MoE GGUF whose expert tensors are cut into one slice per RPC worker.

``serve --split experts`` keeps attention and the router on the head and gives every RPC worker the same
share of every expert: worker ``k`` holds rows ``n_ff_exp*k/shards .. n_ff_exp*(k+1)/shards`` of each
expert's FFN, so all workers compute each token's experts in parallel and the head adds their partial
outputs. ``python -m inference reshard --model SRC --workers N`` writes that file; ``ensure_sharded`` does
the same into a cache keyed by the source's SHA-256 and ``N``, so a restarted head reuses it.

What the output holds
    Every key/value field of the source, byte for byte (``general.alignment`` included, and the tensor
    data are aligned to it), plus a u32 ``<arch>.expert_shard_count`` = ``shards``, ``<arch>`` being
    ``general.architecture``. Every tensor of the source, byte for byte and in the source's order, except
    that each ``blk.{i}.ffn_{gate,up,down}_exps.weight`` is replaced, where it stood, by
    ``blk.{i}.ffn_{gate,up,down}_exps.shard{k}.weight`` for ``k`` = 0 .. shards-1.

Shapes (ggml ``ne`` order, innermost first)
    ``gate``/``up`` are ``[n_embd, n_ff_exp, n_expert]``; slice ``k`` is ``[n_embd, n_ff_exp/shards,
    n_expert]``, rows ``ne[1]`` in the range above. A row is quantized on its own along ``ne[0]``, so the
    slice is a byte copy whatever the type. ``down`` is ``[n_ff_exp, n_embd, n_expert]``; slice ``k`` is
    ``[n_ff_exp/shards, n_embd, n_expert]``, the same range of ``ne[0]``, the quantized dimension. It is a
    byte copy when ``n_ff_exp/shards`` is a whole number of the type's blocks (32 values for Q8_0/Q4_0,
    256 for the K-quants, 1 for F32/F16/BF16). Otherwise (Qwen3-30B-A3B Q4_K_M: 768/4 = 192 values, not a
    multiple of 256) the tensor is dequantized and its slices written as Q8_0, or as F16 when the slice is
    not a multiple of 32 either; ``ReshardResult.requantized`` lists those tensors. Q8_0 holds every value
    of the dequantized source within half a quantization step (``max|x|/254`` per 32-value block, plus
    the rounding of the block's scale to f16); the slices are larger than the source's Q4_K/Q6_K.

Memory and time
    The source is parsed with gguf-py's ``GGUFReader`` (its memmap serves the header and tensor table;
    the tensor data are read with ``pread``, so pages of a 17 GB model do not pile up in this process's
    RSS) and written with ``GGUFWriter`` (header, fields, tensor table), then the data are streamed in
    pieces of at most ``COPY_CHUNK_BYTES`` (byte copies) or ``REQUANT_CHUNK_ELEMS`` values (requantized
    tensors) to their offsets in the output. Each source tensor is read once, each requantized one
    dequantized once. Peak memory is the parsed header plus a few pieces, whatever the model's size; the
    header dominates, as the reader makes numpy views of every vocabulary entry (Qwen3's 151936 tokens
    and merges: about 530 MiB and 10 s). The output appears under its name only when complete and synced
    (written as a hidden ``.NAME.PID.XXXX.partial`` next to it, then renamed). Measured on 2 shared
    cores: ``bench`` q4_k into 4 slices, 8 down tensors requantized, in 1.4 to 2.6 s of writing (3 to
    5 s for the command) with 120 MiB peak RSS; ``qwen3-30b-a3b`` q4_k with ``--layers 1`` (800 MiB) in
    7.8 s of writing (18 s for the command) with 690 MiB, about 5 s per real layer whose ``down`` is
    requantized, so the whole model takes minutes, about as long as reading and writing it.
    Requantizing grows the ``down`` slices: Q8_0 takes 8.5 bits per value against Q4_K's 4.5 and Q6_K's
    6.6, so Qwen3-30B-A3B Q4_K_M over 4 workers is roughly 4 GB larger; over 3 workers (256 values per
    slice, whole K-quant blocks) every slice is a byte copy.

Cache (``ensure_sharded``)
    ``<cache_dir>/<stem>-<sha256[:16]>-experts<shards>-v<FORMAT_VERSION>.gguf``. Hashing reads the whole
    source (64 MiB at a time), so the digest is remembered in ``<cache_dir>/digests.json`` under the
    source's absolute path with its size and ``mtime_ns``; a source whose size or mtime changed is
    hashed again. A partial file left by a writer that no longer runs is removed before writing;
    finished files are never pruned here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.config import DEFAULT_SHARDED_CACHE
from inference.synth import peak_rss_bytes

if TYPE_CHECKING:
    from gguf import GGUFReader, GGUFWriter, ReaderField, ReaderTensor

Progress = Callable[[str], None]

DEFAULT_CACHE_DIR = DEFAULT_SHARDED_CACHE  # serve --sharded-cache-dir's default, so both find one cache
# Bumped whenever reshard writes a different file for the same source, so stale cache entries are not used.
FORMAT_VERSION = 1
DIGESTS_FILE = "digests.json"
HASH_CHUNK_BYTES = 64 << 20
# Most bytes of the source read at once for a byte copy or slice.
COPY_CHUNK_BYTES = 64 << 20
# Most values dequantized at once when requantizing (4 MiB of float32, several times over in temporaries).
REQUANT_CHUNK_ELEMS = 1 << 20
EXPERT_KINDS = ("gate", "up", "down")
# Seconds between two progress lines while writing or hashing.
PROGRESS_EVERY_S = 2.0

_EXPERT_TENSOR = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight")
_HEADER_FIELDS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")
_Q8_0_BLOCK = 32


class ReshardError(Exception):
    """A model or request that cannot be resharded; the message names the model and the fix."""


def shard_count_key(arch: str) -> str:
    """The key holding the number of slices, e.g. ``qwen3moe.expert_shard_count`` (u32)."""
    return f"{arch}.expert_shard_count"


def shard_tensor_name(layer: int, kind: str, shard: int) -> str:
    """Name of slice ``shard`` of a layer's expert tensor: ``blk.{layer}.ffn_{kind}_exps.shard{shard}.weight``."""
    return f"blk.{layer}.ffn_{kind}_exps.shard{shard}.weight"


@dataclass(frozen=True)
class Requantized:
    """A ``down`` tensor whose slices could not be byte copies: written as ``new_type`` (Q8_0 or F16)."""

    tensor: str
    source_type: str
    new_type: str


@dataclass(frozen=True)
class ReshardResult:
    """What ``reshard`` wrote. ``n_bytes`` is the output file's size; ``seconds`` the wall time."""

    path: Path
    source: Path
    arch: str
    shards: int
    n_layers: int
    n_ff_exp: int
    n_tensors: int
    requantized: tuple[Requantized, ...]
    n_bytes: int
    seconds: float
    peak_rss_bytes: int


# --- plan --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _OutTensor:
    name: str
    ne: tuple[int, ...]  # ggml order
    ggml_type: int
    n_bytes: int


@dataclass(frozen=True)
class _Job:
    """One source tensor and the output tensors it becomes (itself, or its slices)."""

    source: ReaderTensor
    outputs: tuple[_OutTensor, ...]
    kind: str | None = None  # None: copied whole; else "gate", "up" or "down"
    n_ff: int = 0


@dataclass(frozen=True)
class _Plan:
    source: Path
    arch: str
    shards: int
    alignment: int
    jobs: tuple[_Job, ...]
    requantized: tuple[Requantized, ...]
    n_layers: int
    n_ff_exp: int


def _type_sizes(ggml_type: int) -> tuple[int, int]:
    """(values per block, bytes per block) of a ggml type."""
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]


def _type_name(ggml_type: int) -> str:
    import gguf

    return gguf.GGMLQuantizationType(ggml_type).name


def _nbytes(ne: tuple[int, ...], ggml_type: int) -> int:
    block, size = _type_sizes(ggml_type)
    return int(np.prod(ne, dtype=np.int64)) // block * size


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(2, min(n, 64) + 1) if n % d == 0)


def _open(source: Path) -> GGUFReader:
    import gguf

    if not source.is_file():
        raise ReshardError(f"model {source} does not exist or is not a file; give the path of a .gguf file")
    try:
        reader = gguf.GGUFReader(source)
    except (ValueError, KeyError, IndexError, OSError) as e:
        raise ReshardError(f"model {source} is not a readable GGUF file ({e}); give a .gguf model") from e
    if reader.byte_order != "I":
        raise ReshardError(
            f"model {source} is a GGUF of the other byte order; convert it first with gguf-py's "
            "gguf_convert_endian.py"
        )
    return reader


def _plan(reader: GGUFReader, source: Path, shards: int) -> _Plan:
    """Check that the model can be resharded into ``shards`` slices and list what to write."""
    import gguf

    _check_shards(source, shards)
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if arch_field is None or arch_field.types != [gguf.GGUFValueType.STRING]:
        raise ReshardError(f"model {source} has no string general.architecture; is it a llama.cpp model?")
    arch = arch_field.contents()
    key = shard_count_key(arch)
    if (done := reader.get_field(key)) is not None:
        raise ReshardError(
            f"model {source} is already an expert split ({key} = {done.contents()}); reshard the original "
            "model instead"
        )
    experts: dict[int, dict[str, ReaderTensor]] = {}
    for t in reader.tensors:
        if "_exps" not in t.name:
            continue
        m = _EXPERT_TENSOR.fullmatch(t.name)
        if m is None:
            hint = (
                "it is already an expert split; reshard the original model instead"
                if ".shard" in t.name
                else "only ffn_gate_exps, ffn_up_exps and ffn_down_exps weights can be split"
            )
            raise ReshardError(f"model {source} has expert tensor {t.name} that cannot be split: {hint}")
        experts.setdefault(int(m.group(1)), {})[m.group(2)] = t
    if not experts:
        raise ReshardError(
            f"model {source} has no expert tensors (*_exps): it is not a mixture-of-experts model; serve it "
            "with --split layer"
        )

    splits: dict[str, _Job] = {}
    requantized: list[Requantized] = []
    n_ff_exp = 0
    for layer, kinds in sorted(experts.items()):
        missing = [k for k in EXPERT_KINDS if k not in kinds]
        if missing:
            raise ReshardError(
                f"model {source}: layer {layer} lacks ffn_{'/'.join(missing)}_exps.weight, so its experts "
                "cannot be split; is the file complete?"
            )
        gate = [int(n) for n in kinds["gate"].shape]
        if len(gate) != 3:
            raise ReshardError(
                f"model {source}: blk.{layer}.ffn_gate_exps.weight has shape {gate}, expected "
                "[n_embd, n_ff_exp, n_expert]"
            )
        n_embd, n_ff, n_expert = gate
        expected = {
            "gate": [n_embd, n_ff, n_expert],
            "up": [n_embd, n_ff, n_expert],
            "down": [n_ff, n_embd, n_expert],
        }
        for kind in EXPERT_KINDS:
            t = kinds[kind]
            if [int(n) for n in t.shape] != expected[kind]:
                raise ReshardError(
                    f"model {source}: {t.name} has shape {[int(n) for n in t.shape]}, expected "
                    f"{expected[kind]} (ggml order) like ffn_gate_exps"
                )
        if n_ff % shards:
            raise ReshardError(
                f"model {source}: the expert FFN width {n_ff} (blk.{layer}) does not divide into {shards} "
                f"equal slices; use a worker count that divides {n_ff} ({_divisors(n_ff)})"
            )
        n_ff_exp = max(n_ff_exp, n_ff)
        width = n_ff // shards
        for kind in EXPERT_KINDS:
            t = kinds[kind]
            _check_layout(source, t)
            out_type = int(t.tensor_type)
            if kind == "down" and width % _type_sizes(out_type)[0]:
                out_type = int(
                    gguf.GGMLQuantizationType.Q8_0
                    if width % _Q8_0_BLOCK == 0
                    else gguf.GGMLQuantizationType.F16
                )
                _check_dequantize(source, t)
                requantized.append(Requantized(t.name, t.tensor_type.name, _type_name(out_type)))
            ne = (n_embd, width, n_expert) if kind != "down" else (width, n_embd, n_expert)
            outputs = tuple(
                _OutTensor(shard_tensor_name(layer, kind, k), ne, out_type, _nbytes(ne, out_type))
                for k in range(shards)
            )
            splits[t.name] = _Job(t, outputs, kind, n_ff)

    jobs = []
    for t in reader.tensors:
        if t.name in splits:
            jobs.append(splits[t.name])
        else:
            ne = tuple(int(n) for n in t.shape)
            jobs.append(_Job(t, (_OutTensor(t.name, ne, int(t.tensor_type), int(t.n_bytes)),)))
    return _Plan(
        source=source,
        arch=arch,
        shards=shards,
        alignment=int(reader.alignment),
        jobs=tuple(jobs),
        requantized=tuple(requantized),
        n_layers=len(experts),
        n_ff_exp=n_ff_exp,
    )


def _check_layout(source: Path, t: ReaderTensor) -> None:
    """The raw data are (n_expert, ne[1], bytes per row), as GGUFReader maps them."""
    n_expert, ne1, ne0 = int(t.shape[2]), int(t.shape[1]), int(t.shape[0])
    block, size = _type_sizes(int(t.tensor_type))
    row_bytes = ne0 // block * size
    data = t.data
    if (
        ne0 % block
        or data.shape[:2] != (n_expert, ne1)
        or data.shape[2] * data.dtype.itemsize != row_bytes
        or data.nbytes != n_expert * ne1 * row_bytes
        or t.n_bytes != data.nbytes
    ):
        raise ReshardError(
            f"model {source}: {t.name} ({t.tensor_type.name}, ne {[int(n) for n in t.shape]}) is mapped as "
            f"{data.shape} {data.dtype}, not {n_expert} experts of {ne1} rows of {row_bytes} bytes; the file "
            "may be damaged"
        )


def _check_dequantize(source: Path, t: ReaderTensor) -> None:
    import gguf

    _, size = _type_sizes(int(t.tensor_type))
    try:
        gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), t.tensor_type)
    except NotImplementedError as e:
        raise ReshardError(
            f"model {source}: {t.name} is {t.tensor_type.name}, which gguf-py cannot dequantize, and its "
            "slices are not whole blocks; choose a worker count whose slices are whole blocks"
        ) from e


# --- writing -----------------------------------------------------------------------------------------


def _field_value(source: Path, field: ReaderField) -> tuple[Any, Any]:
    """(value, array item type) of a key/value field, as GGUFWriter packs it back to the same bytes."""
    import gguf

    vtype = field.types[0]
    if vtype == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]), None
    if vtype != gguf.GGUFValueType.ARRAY:
        return field.parts[field.data[0]][0].item(), None
    if len(field.types) != 2 or field.types[1] == gguf.GGUFValueType.ARRAY:
        what = "an empty array" if len(field.types) == 1 else "an array of arrays"
        raise ReshardError(f"model {source}: field {field.name} is {what}, which gguf-py cannot write back")
    item_type = field.types[1]
    if item_type == gguf.GGUFValueType.STRING:
        return [bytes(field.parts[i]) for i in field.data], item_type
    return [field.parts[i][0].item() for i in field.data], item_type


def _writer(reader: GGUFReader, plan: _Plan, path: Path) -> GGUFWriter:
    import gguf

    w = gguf.GGUFWriter(path, plan.arch)  # adds general.architecture (the source's value) first
    w.data_alignment = plan.alignment
    for name, field in reader.fields.items():
        if name in _HEADER_FIELDS or name == gguf.Keys.General.ARCHITECTURE:
            continue
        value, item_type = _field_value(plan.source, field)
        w.add_key_value(name, value, field.types[0], item_type)
    w.add_uint32(shard_count_key(plan.arch), plan.shards)
    for job in plan.jobs:
        for o in job.outputs:
            w.add_tensor_info(
                o.name,
                tuple(reversed(o.ne)),
                np.dtype(np.float32),
                o.n_bytes,
                raw_dtype=gguf.GGMLQuantizationType(o.ggml_type),
            )
    return w


def _pread(fd: int, n: int, offset: int, source: Path) -> bytes:
    data = os.pread(fd, n, offset)
    while len(data) < n:
        more = os.pread(fd, n - len(data), offset + len(data))
        if not more:
            raise ReshardError(f"model {source} is truncated: tensor data end at byte {offset + n}")
        data += more
    return data


def _pwrite(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _copy(job: _Job, src: int, dst: int, dst_offset: int, source: Path) -> None:
    t = job.source
    for done in range(0, t.n_bytes, COPY_CHUNK_BYTES):
        n = min(COPY_CHUNK_BYTES, t.n_bytes - done)
        _pwrite(dst, _pread(src, n, t.data_offset + done, source), dst_offset + done)


def _split(job: _Job, src: int, dst: int, dst_offsets: list[int], source: Path) -> None:
    """Write every slice of an expert tensor, reading it once, a group of experts at a time."""
    import gguf

    t = job.source
    n_expert, ne1, ne0 = int(t.shape[2]), int(t.shape[1]), int(t.shape[0])
    block, size = _type_sizes(int(t.tensor_type))
    row_bytes = ne0 // block * size
    expert_bytes = ne1 * row_bytes
    shards = len(job.outputs)
    width = job.n_ff // shards
    requantize = job.outputs[0].ggml_type != int(t.tensor_type)
    if requantize:
        group = max(1, REQUANT_CHUNK_ELEMS // (ne0 * ne1))
    else:
        group = max(1, COPY_CHUNK_BYTES // expert_bytes)
    out_type = gguf.GGMLQuantizationType(job.outputs[0].ggml_type)
    slice_expert_bytes = job.outputs[0].n_bytes // n_expert
    for first in range(0, n_expert, group):
        count = min(group, n_expert - first)
        raw = np.frombuffer(
            _pread(src, count * expert_bytes, t.data_offset + first * expert_bytes, source), dtype=np.uint8
        ).reshape(count, ne1, row_bytes)
        # gguf-py (de)quantizes 16 rows per numpy call, which on 64-value rows is mostly interpreter
        # overhead; blocks never straddle rows, so one long row gives the same bytes about 3x faster.
        values = None
        if requantize:
            values = gguf.quants.dequantize(raw.reshape(1, -1), t.tensor_type).reshape(count, ne1, ne0)
        for k in range(shards):
            lo, hi = width * k, width * (k + 1)
            if job.kind != "down":
                piece = raw[:, lo:hi, :]
            elif values is None:
                piece = raw[:, :, lo // block * size : hi // block * size]
            else:
                piece = gguf.quants.quantize(
                    np.ascontiguousarray(values[:, :, lo:hi]).reshape(1, -1), out_type
                )
                if out_type == gguf.GGMLQuantizationType.F16 and not np.isfinite(piece).all():
                    raise ReshardError(
                        f"model {source}: {t.name} has values beyond F16's range, so its slices cannot be "
                        f"F16; use a worker count that divides {job.n_ff} into multiples of 32"
                    )
            piece = np.ascontiguousarray(piece)
            assert piece.nbytes == count * slice_expert_bytes, (t.name, k)
            _pwrite(dst, piece.data, dst_offsets[k] + first * slice_expert_bytes)


def _write(reader: GGUFReader, plan: _Plan, out: Path, progress: Progress | None) -> ReshardResult:
    t0 = time.monotonic()
    say = progress or (lambda _msg: None)
    say(
        f"reshard: {plan.source} ({plan.arch}, {plan.n_layers} expert layers, expert FFN {plan.n_ff_exp}) "
        f"into {plan.shards} slices -> {out}"
    )
    partial = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    total = sum(o.n_bytes for job in plan.jobs for o in job.outputs)
    w = _writer(reader, plan, partial)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        assert w.fout is not None
        fout = w.fout[0]
        w.write_padding(fout, fout.tell())
        fout.flush()
        offset = fout.tell()
        dst = fout.fileno()
        done, last = 0, -PROGRESS_EVERY_S
        with open(plan.source, "rb") as src_file:
            src = src_file.fileno()
            for job in plan.jobs:
                offsets = []
                for o in job.outputs:
                    offsets.append(offset)
                    offset += w.ggml_pad(o.n_bytes, plan.alignment)
                if job.kind is None:
                    _copy(job, src, dst, offsets[0], plan.source)
                else:
                    _split(job, src, dst, offsets, plan.source)
                done += sum(o.n_bytes for o in job.outputs)
                now = time.monotonic() - t0
                if now - last >= PROGRESS_EVERY_S or done == total:
                    last = now
                    say(
                        f"  {100 * done / max(total, 1):5.1f}%  {done / 2**20:9.1f} MiB  {now:6.1f} s  {job.source.name}"
                    )
        os.ftruncate(dst, offset)
        os.fsync(dst)
        w.close()
        os.replace(partial, out)
    finally:
        w.close()
        partial.unlink(missing_ok=True)
    _fsync_dir(out.parent)
    if plan.requantized:
        by_type: dict[str, set[str]] = {}
        for r in plan.requantized:
            by_type.setdefault(r.new_type, set()).add(r.source_type)
        width = plan.n_ff_exp // plan.shards
        for new_type, old in sorted(by_type.items()):
            n = sum(r.new_type == new_type for r in plan.requantized)
            say(
                f"requantized {n} ffn_down_exps tensors ({', '.join(sorted(old))}) to {new_type}: a slice of "
                f"{width} values is not a whole number of their blocks"
            )
    result = ReshardResult(
        path=out,
        source=plan.source,
        arch=plan.arch,
        shards=plan.shards,
        n_layers=plan.n_layers,
        n_ff_exp=plan.n_ff_exp,
        n_tensors=sum(len(job.outputs) for job in plan.jobs),
        requantized=plan.requantized,
        n_bytes=out.stat().st_size,
        seconds=time.monotonic() - t0,
        peak_rss_bytes=peak_rss_bytes(),
    )
    say(
        f"wrote {out}: {result.n_tensors} tensors, {result.n_bytes / 2**20:.1f} MiB in {result.seconds:.1f} s "
        f"(peak RSS {result.peak_rss_bytes / 2**20:.0f} MiB)"
    )
    return result


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_out(source: Path, out: Path) -> None:
    if out.is_dir():
        raise ReshardError(f"output {out} is a directory: give a file path such as {out / source.name}")
    if not out.parent.is_dir():
        raise ReshardError(f"output {out}: directory {out.parent} does not exist; create it first")
    if out.resolve() == source.resolve():
        raise ReshardError(f"output {out} is the model itself; give another path")


def reshard(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    shards: int,
    progress: Progress | None = None,
) -> ReshardResult:
    """Write ``out``: the GGUF ``source`` with each layer's expert tensors cut into ``shards`` slices.

    See the module docstring for names and shapes. ``out`` is replaced atomically once complete; its
    directory must exist. ``progress`` receives human-readable lines (percent, MiB, seconds).

    Raises ReshardError (naming the model and the fix) when ``shards`` < 2, when the expert FFN width
    (``n_ff_exp``, ne[1] of ``ffn_gate_exps``) is not a multiple of ``shards``, when the model is already
    split (has ``<arch>.expert_shard_count``), when it has no ``*_exps`` tensors, or when it is not a
    readable GGUF.
    """
    source, out = Path(source), Path(out)
    reader = _open(source)
    plan = _plan(reader, source, shards)
    _check_out(source, out)
    return _write(reader, plan, out, progress)


# --- cache -------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike[str], progress: Progress | None = None) -> str:
    """Hex SHA-256 of the file, read ``HASH_CHUNK_BYTES`` (64 MiB) at a time, with progress lines."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    buf = bytearray(HASH_CHUNK_BYTES)
    view = memoryview(buf)
    done, t0, last = 0, time.monotonic(), 0.0
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            done += n
            now = time.monotonic() - t0
            if progress is not None and now - last >= PROGRESS_EVERY_S:
                last = now
                progress(
                    f"  hashing {path.name}: {100 * done / max(size, 1):5.1f}%  {done / 2**20:9.1f} MiB  {now:6.1f} s"
                )
    return h.hexdigest()


def _cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()


def _stat_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _load_digests(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    return files if isinstance(files, dict) else {}


def _known_digest(source: Path, cache: Path) -> str | None:
    """The digest recorded in the sidecar for this path, size and mtime_ns, if any."""
    try:
        size, mtime_ns = _stat_key(source)
    except OSError:
        return None
    entry = _load_digests(cache / DIGESTS_FILE).get(str(source.resolve()))
    if isinstance(entry, dict) and entry.get("size") == size and entry.get("mtime_ns") == mtime_ns:
        digest = entry.get("sha256")
        if isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest):
            return digest
    return None


def source_digest(
    source: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> str:
    """Hex SHA-256 of ``source``, from ``<cache_dir>/digests.json`` when its size and mtime_ns still match.

    Otherwise the file is hashed (``file_sha256``) and the digest recorded there. Raises ReshardError if
    the file changes while it is hashed.
    """
    source = Path(source)
    cache = _cache_dir(cache_dir)
    if (digest := _known_digest(source, cache)) is not None:
        return digest
    size, mtime_ns = _stat_key(source)
    if progress is not None:
        progress(f"hashing {source} ({size / 2**20:.1f} MiB) to name its expert split in {cache}")
    digest = file_sha256(source, progress)
    if _stat_key(source) != (size, mtime_ns):
        raise ReshardError(f"model {source} changed while it was being hashed; try again once it is complete")
    cache.mkdir(parents=True, exist_ok=True)
    sidecar = cache / DIGESTS_FILE
    files = _load_digests(sidecar)  # read again: another process may have added entries meanwhile
    files[str(source.resolve())] = {"size": size, "mtime_ns": mtime_ns, "sha256": digest}
    tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    try:
        tmp.write_text(json.dumps({"version": 1, "files": files}, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, sidecar)
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def _check_shards(source: Path, shards: int) -> None:
    if shards < 2:
        raise ReshardError(
            f"cannot split the experts of {source} into {shards} slice(s): an expert split needs at least "
            "2 RPC workers; with one worker use --split layer"
        )


def _cached_file(cache: Path, source: Path, digest: str, shards: int) -> Path:
    return cache / f"{source.stem}-{digest[:16]}-experts{shards}-v{FORMAT_VERSION}.gguf"


def _remove_abandoned(path: Path, progress: Progress | None) -> None:
    """Delete partial files of ``path`` left by writers that died (killed mid-write: no cleanup ran)."""
    for partial in path.parent.glob(f".{path.name}.*.partial"):
        pid = partial.name[len(path.name) + 2 :].split(".")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            if progress is not None:
                progress(f"removing {partial}, left by process {pid} which no longer runs")
            partial.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, another user's


def sharded_path(
    source: str | os.PathLike[str],
    shards: int,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> Path:
    """Where the cache keeps ``source`` split into ``shards`` slices (the file may not exist yet).

    ``<cache_dir>/<stem>-<sha256[:16]>-experts<shards>-v<FORMAT_VERSION>.gguf``; ``cache_dir`` defaults
    to ``~/.cache/llmfleet/sharded``. May hash the source (see ``source_digest``). Raises ReshardError
    when ``shards`` < 2.
    """
    source = Path(source)
    _check_shards(source, shards)
    return _cached_file(_cache_dir(cache_dir), source, source_digest(source, cache_dir, progress), shards)


def ensure_sharded(
    source: str | os.PathLike[str],
    shards: int,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> Path:
    """The cached expert split of ``source`` into ``shards`` slices, written first if missing.

    A file present under ``sharded_path`` is complete (it is renamed into place only once written and
    synced), so it is reused as is; when the sidecar already knows the source's digest that takes two
    ``stat`` calls and no parsing. Otherwise the model is checked before it is hashed, so the errors of
    ``reshard`` come at once, then hashed, then written. Raises ReshardError, also when the source
    changes while it is read.
    """
    source = Path(source)
    cache = _cache_dir(cache_dir)
    _check_shards(source, shards)
    digest = _known_digest(source, cache)
    if digest is None or not (path := _cached_file(cache, source, digest, shards)).is_file():
        reader = _open(source)
        plan = _plan(reader, source, shards)
        before = _stat_key(source)
        path = sharded_path(source, shards, cache, progress)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_abandoned(path, progress)
            _write(reader, plan, path, progress)
            if _stat_key(source) != before:
                path.unlink(missing_ok=True)
                raise ReshardError(
                    f"model {source} changed while it was being resharded; try again once it is complete"
                )
            return path
    if progress is not None:
        progress(f"reusing {path}")
    return path


def main_reshard(model: str, workers: int, out: str | None, cache_dir: str | None) -> int:
    """The ``reshard`` command: progress on stderr, the output path alone on stdout."""

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        path = (
            reshard(model, out, workers, say).path if out else ensure_sharded(model, workers, cache_dir, say)
        )
    except ReshardError as e:
        print(f"reshard: error: {e}", file=sys.stderr)
        return 2
    print(path, flush=True)
    return 0
