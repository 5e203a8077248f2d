"""Hardening of checkpoint reading: files changed after loading, files that are not regular files, symbolic
links, safetensors headers (against the safetensors library itself), nested JSON, the shard index, tokenizer
and generation files, config fields, and memory sizes. Every refusal is one line and an engine exception."""

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tiny_models as tm
from offload_engine import CheckpointError, MemoryBudgetError, OffloadEngine, OffloadEngineError
from offload_engine.checkpoint.directory import SafetensorsFile
from offload_engine.planning.memory_plan import MAX_BYTES, parse_bytes
from test_bad_input import cli_exits_2, copy_of, fingerprint, good_dir  # noqa: F401 (good_dir: a fixture)
from tiny_tokenizer import save_char_tokenizer

PROMPT = [3, 4, 5, 6]


@pytest.fixture
def no_hang():
    """A reader blocked on a FIFO fails the test instead of hanging the suite."""
    def blocked(*_):
        raise TimeoutError("blocked reading the checkpoint")
    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def tokenized_dir(good_dir, tmp_path_factory):  # noqa: F811
    path = tmp_path_factory.mktemp("tok") / "model"
    shutil.copytree(good_dir, path)
    save_char_tokenizer(path)
    return path


def load(path, **kwargs):
    return OffloadEngine.from_pretrained(path, device="cpu", expert_slots=2, progress=False, **kwargs)


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# -- files changed on disk after loading ------------------------------------------------------------------

CHANGE_AFTER_LOADING = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from offload_engine import CheckpointError, OffloadEngine
    path, mode, change = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    engine = OffloadEngine.from_pretrained(path, device="cpu", expert_slots=2, host_memory=mode, progress=False)
    engine.generate([3, 4, 5], max_new_tokens=2)  # the file is mapped and read
    shard = path / "model.safetensors"
    if change == "truncate":
        os.truncate(shard, shard.stat().st_size // 2)
    else:
        os.utime(shard, ns=(0, 0))
    try:
        engine.generate([7, 8, 9, 10, 11], max_new_tokens=8)
    except CheckpointError as e:
        print(e)
        sys.exit(0)
    sys.exit(1)
""")


@pytest.mark.parametrize("mode, change", [("mmap", "truncate"), ("files", "truncate"), ("mmap", "modify")])
def test_a_checkpoint_changed_after_loading_is_an_error_not_a_crash(good_dir, tmp_path, mode, change):  # noqa: F811
    """In a subprocess: a SIGBUS from a truncated memory map would kill it (a negative return code)."""
    path = copy_of(good_dir, tmp_path)
    proc = subprocess.run([sys.executable, "-c", CHANGE_AFTER_LOADING, str(path), mode, change],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "changed on disk after loading" in proc.stdout and "reload the model" in proc.stdout
    assert proc.stdout.count("\n") == 1


@pytest.mark.parametrize("mode", ["mmap", "files"])
def test_a_deleted_checkpoint_keeps_serving_the_loaded_files(good_dir, tmp_path, mode):  # noqa: F811
    """The descriptors opened at load time keep the files readable, as the loaded model expects."""
    path = copy_of(good_dir, tmp_path)
    engine = load(path, host_memory=mode)
    before = engine.generate(PROMPT, max_new_tokens=12).token_ids
    fresh = load(path, host_memory=mode)
    shutil.rmtree(path)
    assert fresh.generate(PROMPT, max_new_tokens=12).token_ids == before


# -- only regular files, links inside the checkpoint ----------------------------------------------------

def make_special(path, kind):
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        return sock
    return None


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "generation_config.json"])
@pytest.mark.parametrize("kind", ["fifo", "directory", "socket"])
def test_a_file_that_is_not_a_regular_file_is_refused_without_blocking(tokenized_dir, tmp_path, name, kind,
                                                                       no_hang, capsys):
    path = copy_of(tokenized_dir, tmp_path)
    sock = make_special(path / name, kind)
    try:
        with pytest.raises(CheckpointError, match="not a regular file"):
            load(path)
        cli_exits_2(capsys, "not a regular file", "plan", "--model", str(path))
    finally:
        if sock is not None:
            sock.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node needs root")
def test_a_device_is_refused(good_dir, tmp_path, no_hang):  # noqa: F811
    path = copy_of(good_dir, tmp_path)
    (path / "model.safetensors").unlink()
    os.mknod(path / "model.safetensors", 0o600 | 0o020000, os.makedev(1, 3))  # /dev/null's numbers
    with pytest.raises(CheckpointError, match="character device"):
        load(path)


def test_a_link_out_of_the_checkpoint_is_refused(good_dir, tmp_path):  # noqa: F811
    path = copy_of(good_dir, tmp_path)
    elsewhere = tmp_path / "elsewhere.safetensors"
    (path / "model.safetensors").rename(elsewhere)
    (path / "model.safetensors").symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        load(path)


def test_links_inside_a_hub_cache_repository_are_followed(good_dir, tmp_path):  # noqa: F811
    """huggingface_hub's layout: snapshots/<rev>/file -> ../../blobs/<hash>."""
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(good_dir.iterdir())):
        shutil.copy(f, repo / "blobs" / f"blob{i}")
        (snapshot / f.name).symlink_to(f"../../blobs/blob{i}")
    reference = load(good_dir).generate(PROMPT, max_new_tokens=8).token_ids
    assert load(snapshot).generate(PROMPT, max_new_tokens=8).token_ids == reference
    outside = tmp_path / "outside.json"
    shutil.copy(good_dir / "config.json", outside)
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        load(snapshot)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_link_loops_and_broken_links_are_one_line(good_dir, tmp_path, name, capsys):  # noqa: F811
    path = copy_of(good_dir, tmp_path)
    (path / name).unlink()
    (path / name).symlink_to(name)
    with pytest.raises(CheckpointError, match="symbolic link loop"):
        load(path)
    cli_exits_2(capsys, "symbolic link loop", "plan", "--model", str(path))
    (path / name).unlink()
    (path / name).symlink_to("gone")
    with pytest.raises(CheckpointError, match="broken symbolic link"):
        load(path)


def test_a_model_directory_that_is_a_link_loop_is_one_line(tmp_path, capsys):
    (tmp_path / "m").symlink_to("m")
    with pytest.raises(CheckpointError, match="symbolic link loop"):
        load(tmp_path / "m")


# -- safetensors headers, as the safetensors library reads them ---------------------------------------------

SUPPORTED = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "BOOL": 1}


def write_safetensors(path, header: bytes, data_len: int):
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(data_len))


def library_accepts(path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            list(f.keys())
        return True
    except Exception:  # noqa: BLE001 - the library's verdict is all that matters here
        return False


def ours_accepts(path) -> bool:
    try:
        SafetensorsFile(path, path.parent).close()
        return True
    except CheckpointError:
        return False


tensor_entries = st.lists(st.tuples(st.sampled_from(sorted(SUPPORTED)), st.lists(st.integers(0, 3), max_size=3)),
                          min_size=0, max_size=4)
mutations = st.sampled_from(["none", "gap", "overlap", "swap", "trailing", "short", "negative", "float", "bool",
                             "three_offsets", "drop_shape", "metadata_int", "metadata_str", "not_object", "lower_dtype",
                             "huge_shape", "extra_field", "leading_space", "trailing_nul"])


@settings(max_examples=150, deadline=None)
@given(tensors=tensor_entries, mutation=mutations, pick=st.integers(0, 3))
def test_headers_are_accepted_exactly_when_the_safetensors_library_accepts_them(tmp_path_factory, tensors, mutation,
                                                                               pick):
    header, offset = {}, 0
    for i, (dtype, shape) in enumerate(tensors):
        size = SUPPORTED[dtype]
        for d in shape:
            size *= d
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    data_len = offset
    entry = header[f"t{pick % len(tensors)}"] if tensors else None
    if entry is not None:
        begin, end = entry["data_offsets"]
        edits = {"gap": [begin + 1, end + 1], "overlap": [max(begin - 1, 0), end - 1], "swap": [end, begin],
                 "negative": [-1, end], "float": [float(begin), end], "bool": [begin, True],
                 "three_offsets": [begin, end, end]}
        if mutation in edits:
            entry["data_offsets"] = edits[mutation]
        entry.update({"drop_shape": {"shape": None}, "lower_dtype": {"dtype": entry["dtype"].lower()},
                      "huge_shape": {"shape": [2**40, 2**40, 2**40]}, "extra_field": {"x": 1}}.get(mutation, {}))
        if entry.get("shape", 0) is None:
            del entry["shape"]
    if mutation == "metadata_int":
        header["__metadata__"] = {"format": 1}
    if mutation == "metadata_str":
        header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header if mutation != "not_object" else list(header)).encode()
    raw = {"leading_space": b" " + raw, "trailing_nul": raw + b"\x00"}.get(mutation, raw)
    data_len += {"trailing": 3, "short": -1}.get(mutation, 0)
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    write_safetensors(path, raw, max(data_len, 0))
    assert ours_accepts(path) == library_accepts(path), (mutation, header)


@pytest.mark.parametrize("header, needle", [
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
     b'"b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}', "overlap or leave a gap"),
    (b'{"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', "malformed header entry"),
    (b'{"a": {"dtype": 5, "shape": [2], "data_offsets": [0, 8]}}', "malformed header entry"),
    (b'"just a string"', "not a JSON object"),
    (b'{"a": ' * 100 + b"1" + b"}" * 100, "nested more than 64 levels"),
    (b"[" * 5000 + b"]" * 5000, "nested more than 64 levels"),
])
def test_malformed_headers_name_the_file(good_dir, tmp_path, capsys, header, needle):  # noqa: F811
    path = copy_of(good_dir, tmp_path)
    write_safetensors(path / "model.safetensors", header, 12)
    with pytest.raises(CheckpointError, match=needle):
        load(path)
    cli_exits_2(capsys, "model.safetensors", "plan", "--model", str(path))


# -- nested JSON, the shard index, tokenizer and generation files ---------------------------------------------

DEEP = "[" * 3000 + "]" * 3000  # deeper than Python's recursion limit
NESTED = '{"a": ' * 70 + "1" + "}" * 70  # fine for Python, deeper than the tokenizers library reads


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json",
                                  "tokenizer.json", "special_tokens_map.json"])
@pytest.mark.parametrize("text", [DEEP, NESTED], ids=["deep", "nested"])
def test_deeply_nested_json_is_one_line(tokenized_dir, tmp_path, capsys, name, text):
    path = copy_of(tokenized_dir, tmp_path)
    (path / name).write_text(text)
    with pytest.raises(CheckpointError, match="nested more than 64 levels"):
        load(path)
    cli_exits_2(capsys, name, "plan", "--model", str(path))


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded") / "model"
    tm.save_checkpoint(tm.build_reference("mixtral"), path, "sharded")
    return path


@pytest.mark.parametrize("index, needle", [
    (DEEP, "nested more than 64 levels"),
    ('{"weight_map": [1, 2]}', "no weight_map object"),
    ('{"weight_map": {"lm_head.weight": 7}}', "not a shard file name"),
    ('{"weight_map": {"lm_head.weight": "../outside.safetensors"}}', "outside the checkpoint directory"),
    ('{"weight_map": {"lm_head.weight": "/etc/passwd"}}', "outside the checkpoint directory"),
    ('{"weight_map": {"lm_head.weight": "a\\u0000b"}}', "not a shard file name"),
])
def test_a_malformed_index_is_one_line(sharded_dir, tmp_path, capsys, index, needle):
    path = copy_of(sharded_dir, tmp_path)
    (path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=needle):
        load(path)
    cli_exits_2(capsys, "model.safetensors.index.json", "plan", "--model", str(path))


def test_an_index_that_is_not_utf8_is_one_line(sharded_dir, tmp_path):
    path = copy_of(sharded_dir, tmp_path)
    (path / "model.safetensors.index.json").write_bytes(b'{"weight_map": {"\xff": "x"}}')
    with pytest.raises(CheckpointError, match="not UTF-8"):
        load(path)


def test_shards_in_sub_folders_are_found_by_their_path_not_their_name(sharded_dir, tmp_path):
    """Two shards with the same file name in different folders: each tensor comes from its own."""
    path = copy_of(sharded_dir, tmp_path)
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    moved = {}
    for i, name in enumerate(sorted(set(index["weight_map"].values()))):
        (path / f"part{i}").mkdir()
        (path / name).rename(path / f"part{i}" / "shard.safetensors")
        moved[name] = f"part{i}/shard.safetensors"
    index["weight_map"] = {k: moved[v] for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    reference = load(sharded_dir).generate(PROMPT, max_new_tokens=10).token_ids
    assert load(path).generate(PROMPT, max_new_tokens=10).token_ids == reference


@pytest.mark.parametrize("name, text", [
    ("tokenizer.json", "[1, 2]"),
    ("tokenizer.json", "{}"),
    ("tokenizer.json", '{"model": [1], "added_tokens": []}'),
    ("tokenizer_config.json", "[1]"),
    ("tokenizer_config.json", '{"tokenizer_class": 5}'),
    ("tokenizer_config.json", '{"added_tokens_decoder": [1]}'),
    ("tokenizer_config.json", '{"model_max_length": "long"}'),
    ("special_tokens_map.json", '{"eos_token": 3}'),
    ("special_tokens_map.json", '"eos"'),
    ("generation_config.json", "[1]"),
    ("generation_config.json", '{"eos_token_id": "x"}'),
    ("generation_config.json", '{"watermarking_config": 5}'),
    ("tokenizer_config.json", b'{"eos_token": "\xff"}'),
])
def test_tokenizer_and_generation_files_of_the_wrong_shape_are_one_line(tokenized_dir, tmp_path, capsys, name, text):
    path = copy_of(tokenized_dir, tmp_path)
    (path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    before = fingerprint(path)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load(path)
    cli_exits_2(capsys, name, "generate", "--model", str(path), "--expert-slots", "2")
    assert fingerprint(path) == before


# -- config fields ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, needle", [
    ("num_experts_per_tok", 9, "routes each token to 9 experts, but its MoE layers have only 8"),
    ("max_position_embeddings", -5, "max_position_embeddings"),
    ("max_position_embeddings", 0, "max_position_embeddings"),
    ("vocab_size", 0, "vocab_size"),
    ("vocab_size", "many", "vocab_size"),
    ("vocab_size", 1e30, "vocab_size"),
    ("vocab_size", 10**30, "too large for a 64-bit integer"),
    ("hidden_size", -32, "hidden_size"),
    ("num_local_experts", 10**12, "num_local_experts"),
    ("num_attention_heads", True, "num_attention_heads"),
    ("eos_token_id", "x", "eos_token_id"),
    ("model_type", 5, "model_type"),
])
def test_config_fields_are_type_and_range_checked(good_dir, tmp_path, capsys, field, value, needle):  # noqa: F811
    path = copy_of(good_dir, tmp_path)
    edit_json(path / "config.json", **{field: value})
    with pytest.raises(CheckpointError, match=needle):
        load(path)
    cli_exits_2(capsys, needle.split()[0], "plan", "--model", str(path))


def test_numbers_too_large_for_a_float_are_one_line(good_dir, tmp_path, capsys):  # noqa: F811
    path = copy_of(good_dir, tmp_path)
    text = (path / "config.json").read_text().replace("{", '{"rope_theta": 1e400, ', 1)
    (path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match="rope_theta = inf is not a finite number"):
        load(path)
    cli_exits_2(capsys, "rope_theta", "plan", "--model", str(path))


# -- memory sizes ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["9" * 400, "9" * 400 + "GiB", "inf", "nan", "1e400", "-1GiB", "0.1", "2048TiB",
                                  10**400, 0, "0." + "0" * 6000 + "1GiB"])
def test_memory_sizes_out_of_range_are_one_line(text):
    with pytest.raises(MemoryBudgetError) as err:
        parse_bytes(text)
    assert "\n" not in str(err.value) and len(str(err.value)) < 300


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60) | st.integers() | st.from_regex(r"\s*[0-9]{0,30}\.?[0-9]{1,30}\s*[kKmMgGtTiIbB]{0,3}"))
def test_parse_bytes_returns_a_size_in_range_or_one_clear_error(text):
    try:
        value = parse_bytes(text)
    except MemoryBudgetError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(value, int) and 1 <= value <= MAX_BYTES


def test_exact_decimal_sizes():
    assert parse_bytes("0.1GB") == 100_000_000 and parse_bytes("1.5GiB") == 3 * 2**29
    assert parse_bytes("1024TiB") == MAX_BYTES


def test_every_refusal_is_an_engine_exception(good_dir, tmp_path):  # noqa: F811
    """A spot check across the classes above: never a bare OSError, KeyError or RecursionError."""
    path = copy_of(good_dir, tmp_path)
    (path / "config.json").write_text(DEEP)
    with pytest.raises(OffloadEngineError):
        load(path)
