"""The synthetic qwen3moe GGUF: llama.cpp loads it, runs it, and tokenizes text with its vocabulary."""

from __future__ import annotations

import ctypes
import hashlib

import jinja2
import numpy as np
import pytest

from inference import cli, synth

llama_cpp = pytest.importorskip("llama_cpp")

TEXTS = [
    "Hello, world! The cluster serves 2048 tokens per second.",
    "naïve café, Straße, Ελληνικά, русский, 中文字符, 日本語のテキスト, 한국어",
    "emoji 🦙🚀👩‍👩‍👧‍👦 and flags 🇫🇷 and skin tones 👍🏽",
    "  leading spaces, tabs\tand\r\nnewlines\n\n\ntrailing   ",
    "code: def f(x):\n    return {'a': [1, 2.5e-3]}  # ünïcödé\x00\x7f",
    "<|im_start|> written as text is not a special token <|im_end|>",
]


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _meta(llm, key: str) -> str:
    buf = ctypes.create_string_buffer(512)
    n = llama_cpp.llama_model_meta_val_str(llm.model, key.encode(), buf, len(buf))
    assert n >= 0, f"{key} missing"
    return buf.value.decode()


def _greedy(llm, prompt: bytes, n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens after ``prompt`` and the top-1/top-2 logit margin at each step."""
    llm.reset()
    llm.eval(llm.tokenize(prompt, add_bos=False))
    tokens, margins = [], []
    for _ in range(n):
        logits = np.array(llm.scores[llm.n_tokens - 1])
        top2 = np.sort(logits)[-2:]
        margins.append(float(top2[1] - top2[0]))
        tokens.append(int(np.argmax(logits)))
        llm.eval([tokens[-1]])
    return tokens, margins


def _load(path, **kw):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False, **kw)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    paths = {}
    for quant in synth.QUANTS:
        paths[quant] = synth.synth_model("tiny", quant, out / f"tiny-{quant}.gguf", seed=7).path
    return paths


def test_shapes_are_valid_qwen3moe_shapes():
    for name, s in synth.SHAPES.items():
        assert 0 < s.n_expert_used <= s.n_expert, name
        assert s.n_head % s.n_head_kv == 0, name
        assert s.head_dim % 2 == 0, name
        for spec in synth.tensor_plan(s):
            if spec.kind == "weight":
                assert spec.shape[-1] % 32 == 0, (name, spec.name)
    # tiny's rows are multiples of 256, so its q4_k is real Q4_K rather than llama.cpp's fallback types
    tiny = synth.tensor_plan(synth.SHAPES["tiny"])
    assert all(spec.shape[-1] % 256 == 0 for spec in tiny if spec.kind == "weight")


def test_qwen3_30b_a3b_plan_has_the_real_tensor_shapes():
    shape = synth.SHAPES["qwen3-30b-a3b"]
    plan = {t.name: t.shape[::-1] for t in synth.tensor_plan(shape)}  # ggml order, as llama.cpp states it
    assert len(plan) == 3 + 48 * 12
    assert plan["token_embd.weight"] == (2048, 151936)
    assert plan["output.weight"] == (2048, 151936)
    assert plan["blk.47.attn_q.weight"] == (2048, 4096)
    assert plan["blk.47.attn_k.weight"] == (2048, 512)
    assert plan["blk.47.attn_output.weight"] == (4096, 2048)
    assert plan["blk.47.attn_q_norm.weight"] == (128,)
    assert plan["blk.47.ffn_gate_inp.weight"] == (2048, 128)
    assert plan["blk.47.ffn_gate_exps.weight"] == (2048, 768, 128)
    assert plan["blk.47.ffn_down_exps.weight"] == (768, 2048, 128)
    assert synth._total_params(shape) == 30_532_122_624


def test_vocab_is_byte_level_bpe_with_qwen_special_tokens():
    v = synth.build_vocab(1024)
    assert len(v.tokens) == 1024 and len(set(v.tokens)) == 1024
    assert v.tokens[:3] == ["!", '"', "#"] and "Ġ" in v.tokens[:256] and "Ċ" in v.tokens[:256]
    assert sorted(v.tokens[:256]) == sorted(synth.bytes_to_unicode())
    n_special = len(synth.SPECIAL_TOKENS)
    assert n_special == 26
    assert len(v.merges) == 1024 - 256 - n_special
    known = set(v.tokens[:256])
    for i, merge in enumerate(v.merges):
        a, b = merge.split(" ")
        assert a in known and b in known
        assert v.tokens[256 + i] == a + b
        known.add(a + b)
    assert v.special == {t: 998 + i for i, t in enumerate(synth.SPECIAL_TOKENS)}
    assert v.special["<|im_end|>"] == 1000 and v.special["<think>"] == 1022
    control, user_defined = 3, 4
    assert v.types[998:1001] == [control] * 3
    assert [v.types[v.special[t]] for t in ("<tool_call>", "</tool_call>", "<think>", "</think>")] == [
        user_defined
    ] * 4
    assert set(v.types[:998]) == {1}
    assert "Ġthe" in v.tokens  # merges learnt from English text come first


def test_qwen3_30b_a3b_vocab_uses_qwen3_special_ids():
    v = synth.build_vocab(151936, 151643)
    assert v.special["<|endoftext|>"] == 151643 and v.special["<|im_end|>"] == 151645
    assert v.special["<tool_call>"] == 151657 and v.special["</tool_call>"] == 151658
    assert v.special["<tool_response>"] == 151665 and v.special["</think>"] == 151668
    assert v.tokens[151669] == "[PAD151669]" and v.types[151669] == 5
    assert len(v.tokens) == 151936


@pytest.mark.parametrize("quant", synth.QUANTS)
def test_llama_cpp_loads_and_runs_the_model(models, quant):
    llm = _load(models[quant])
    assert _meta(llm, "general.architecture") == "qwen3moe"
    assert _meta(llm, "qwen3moe.expert_count") == "4"
    assert _meta(llm, "qwen3moe.expert_used_count") == "2"
    assert _meta(llm, "qwen3moe.block_count") == "4"
    assert llm.n_vocab() == 1024
    assert llama_cpp.llama_model_n_params(llm.model) == synth._total_params(synth.SHAPES["tiny"])
    ftype = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k": "Q4_K - Medium"}[quant]
    desc = ctypes.create_string_buffer(128)
    llama_cpp.llama_model_desc(llm.model, desc, len(desc))
    assert desc.value.decode().endswith(ftype)
    tokens, margins = _greedy(llm, b"The cluster serves a language model", 16)
    assert len(set(tokens)) >= 4, "greedy decoding is stuck on a few tokens"
    assert np.median(margins) > 0.3, "logits are nearly tied"
    text = llm.create_completion("Hello", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    assert isinstance(text, str)


def test_same_seed_same_file_and_tokens(models, tmp_path):
    again = synth.synth_model("tiny", "q8_0", tmp_path / "again.gguf", seed=7).path
    assert _sha256(again) == _sha256(models["q8_0"])
    other = synth.synth_model("tiny", "q8_0", tmp_path / "other.gguf", seed=8).path
    assert _sha256(other) != _sha256(models["q8_0"])
    a, _ = _greedy(_load(models["q8_0"]), b"Hello", 12)
    b, _ = _greedy(_load(again), b"Hello", 12)
    c, _ = _greedy(_load(other), b"Hello", 12)
    assert a == b
    assert a != c


def test_the_file_is_the_same_whatever_the_number_of_processes(tmp_path):
    # one layer of the bench shape: its embedding, output and expert tensors span several pieces each, so
    # pieces made out of order by several processes must still land in file order
    serial = synth.synth_model("bench", "q4_0", tmp_path / "one.gguf", layers=1, jobs=1)
    parallel = synth.synth_model("bench", "q4_0", tmp_path / "three.gguf", layers=1, jobs=3)
    assert serial.n_bytes == parallel.n_bytes > 3 * 4 * synth.CHUNK_ELEMS // 8
    assert _sha256(serial.path) == _sha256(parallel.path)


def test_reduced_layers_share_the_full_models_tensors(models, tmp_path):
    import gguf

    small = synth.synth_model("tiny", "q8_0", tmp_path / "two.gguf", seed=7, layers=2).path
    full = {t.name: bytes(t.data) for t in gguf.GGUFReader(models["q8_0"]).tensors}
    reader = gguf.GGUFReader(small)
    assert reader.fields["qwen3moe.block_count"].contents() == 2
    assert {t.name for t in reader.tensors} == {n for n in full if not n.startswith(("blk.2.", "blk.3."))}
    for t in reader.tensors:
        assert bytes(t.data) == full[t.name], t.name


def test_q4_0_is_the_q8_0_model_rounded(models):
    import gguf

    q8 = {t.name: t for t in gguf.GGUFReader(models["q8_0"]).tensors}
    for t in gguf.GGUFReader(models["q4_0"]).tensors:
        a = gguf.dequantize(q8[t.name].data, q8[t.name].tensor_type).ravel()
        b = gguf.dequantize(t.data, t.tensor_type).ravel()
        if t.tensor_type == gguf.GGMLQuantizationType.Q4_0:
            assert np.corrcoef(a, b)[0, 1] > 0.99, t.name
        else:
            assert np.array_equal(a, b), t.name


@pytest.mark.parametrize("text", TEXTS)
def test_tokenize_detokenize_round_trip(models, text):
    llm = _load(models["q8_0"], vocab_only=True)
    tokens = llm.tokenize(text.encode(), add_bos=False, special=False)
    assert llm.detokenize(tokens).decode() == text
    assert llm.tokenize(text.encode()) == tokens  # add_bos is off, as in Qwen3


def test_special_tokens(models):
    llm = _load(models["q8_0"], vocab_only=True)
    assert llm.token_eos() == 1000 and llm.token_bos() == 998
    ids = llm.tokenize(b"<|im_start|>user\nhi<|im_end|>\n", add_bos=False, special=True)
    assert ids[0] == 999 and 1000 in ids
    assert 999 not in llm.tokenize(b"<|im_start|>", add_bos=False, special=False)
    assert llama_cpp.llama_vocab_is_eog(llm._model.vocab, 1000)
    assert llama_cpp.llama_vocab_is_control(llm._model.vocab, 998)
    # As in Qwen3: tool-call and thinking tags are one token each, printed in replies, and not control.
    assert llm.tokenize(b"<tool_call>\n{}</tool_call>", add_bos=False, special=False) == [
        1012,
        198,
        90,
        92,
        1013,
    ]
    assert llm.detokenize([1022, 1023]) == b"<think></think>"
    assert not llama_cpp.llama_vocab_is_control(llm._model.vocab, 1022)


def test_chat_template(models):
    llm = _load(models["q8_0"])
    template = llm.metadata["tokenizer.chat_template"]
    assert template == synth.CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again"},
    ]
    env = jinja2.Environment()
    rendered = env.from_string(template).render(messages=messages, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n"
    )
    reply = llm.create_chat_completion(messages=messages, max_tokens=4, temperature=0.0)
    assert reply["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize(
    ("shape", "desc"), [("bench", "qwen3moe ?B Q8_0"), ("qwen3-30b-a3b", "qwen3moe 30B.A3B Q8_0")]
)
def test_header_of_large_shapes_loads_in_llama_cpp(tmp_path, shape, desc):
    """The metadata and tensor table, checked by llama.cpp's loader without reading (or writing) data."""
    path = synth.write_header_only(shape, "q8_0", tmp_path / f"{shape}.gguf")
    assert path.stat().st_blocks * 512 < 64 << 20  # sparse: the data is a hole
    params = llama_cpp.llama_model_default_params()
    params.no_alloc = True
    params.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE
    params.lazy_mode = llama_cpp.LLAMA_LAZY_MODE_OFF
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    assert model
    try:
        buf = ctypes.create_string_buffer(128)
        llama_cpp.llama_model_desc(model, buf, len(buf))
        assert buf.value.decode() == desc
        s = synth.SHAPES[shape]
        assert llama_cpp.llama_model_n_params(model) == synth._total_params(s)
        assert llama_cpp.llama_model_n_layer(model) == s.n_layer
        assert llama_cpp.llama_model_n_embd(model) == s.n_embd
        assert llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)) == s.n_vocab
    finally:
        llama_cpp.llama_model_free(model)


def test_cli_writes_the_model(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    argv = ["synth-model", "--shape", "tiny", "--quant", "q4_0", "--out", str(out), "--seed", "3"]
    assert cli.main(argv) == 0
    assert out.is_file() and not (tmp_path / "m.gguf.partial").exists()
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shape", "huge", "--quant", "q8_0", "--out", "x.gguf"], "argument --shape: invalid choice"),
        (["--shape", "tiny", "--quant", "q3", "--out", "x.gguf"], "argument --quant: invalid choice"),
        (["--shape", "tiny", "--quant", "q8_0"], "--out"),
        (["--shape", "tiny", "--quant", "q8_0", "--out", "x.gguf", "--seed", "abc"], "argument --seed"),
        (["--shape", "tiny", "--quant", "q8_0", "--out", "x.gguf", "--layers", "0"], "argument --layers"),
        (["--shape", "tiny", "--quant", "q8_0", "--out", "x.gguf", "--jobs", "0"], "argument --jobs"),
    ],
)
def test_cli_rejects_bad_arguments(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["synth-model", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layers", "5"], "--layers must be between 1 and 4"),
        (["--out", "{tmp}/missing/m.gguf"], "directory {tmp}/missing does not exist"),
        (["--out", "{tmp}"], "is a directory"),
    ],
)
def test_cli_explains_impossible_requests(tmp_path, capsys, args, message):
    argv = ["synth-model", "--shape", "tiny", "--quant", "q8_0", "--out", str(tmp_path / "m.gguf")]
    argv += [a.format(tmp=tmp_path) for a in args]
    assert cli.main(argv) == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()
