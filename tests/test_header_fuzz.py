"""Fuzzing the header parser: random bytes and mutated valid headers, seeded.

Every case must end in success or in a ConversionError (exit status 2 on the command line): never another
exception, never a file left beside the input. Most cases run in-process through `convert_file` (the path the
command line takes) for speed; a handful go through the command line itself.
"""

import json
import os
import random
import struct

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_cli
from quant_core import ConversionError, ConvertOptions, convert_file, load_dequantized_state_dict

SEED = 20240917
CASES = 3000

WEIRD_VALUES = [None, True, False, 0, 1, -1, 2, 3, 4, 16, 2 ** 31, 2 ** 32, 2 ** 53 + 1, 2 ** 63 - 1, 2 ** 63,
                2 ** 64, -2 ** 63, 10 ** 30, 1.5, -0.0, 1e308, "F32", "BF16", "F8_E4M3", "I64", "", "\u202e",
                "x" * 300, [], [0], [1, 1], [0, 0], [2 ** 62, 2 ** 62, 0], [[1]], {}, {"dtype": "F32"},
                [-1, 4], [4, 2], [0, 2 ** 70], "[1,2]"]


def _valid(tmp_path):
    path = tmp_path / "valid.safetensors"
    save_file({"a.weight": torch.randn(4, 4), "a.bias": torch.randn(4), "b.weight": torch.randn(2, 3).bfloat16(),
               "idx": torch.arange(3, dtype=torch.int64)}, str(path), metadata={"k": "v"})
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _pack(header_bytes: bytes, data: bytes, n: int | None = None) -> bytes:
    return struct.pack("<Q", len(header_bytes) if n is None else n) + header_bytes + data


def _mutate(rng: random.Random, header: dict, data: bytes) -> bytes:
    kind = rng.randrange(9)
    if kind == 0:  # random bytes
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
    if kind == 1:  # a random header length in front of valid content
        raw = json.dumps(header).encode()
        n = rng.choice([0, 1, 7, len(raw) - 1, len(raw) + 1, 2 ** 64 - 1, 2 ** 27, rng.randrange(2 ** 16)])
        return _pack(raw, data, n)
    if kind == 2:  # flip bytes of the JSON
        raw = bytearray(json.dumps(header).encode())
        for _ in range(rng.randrange(1, 6)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return _pack(bytes(raw), data)
    if kind == 3:  # cut the file anywhere
        blob = _pack(json.dumps(header).encode(), data)
        return blob[: rng.randrange(len(blob))]
    if kind == 4:  # truncate or extend the data section
        return _pack(json.dumps(header).encode(), data[: rng.randrange(len(data) + 1)] + bytes(rng.randrange(3)))
    h = json.loads(json.dumps(header))
    key = rng.choice([k for k in h if k != "__metadata__"])
    if kind == 5:  # replace one field by a weird value
        field = rng.choice(["dtype", "shape", "data_offsets"])
        h[key][field] = rng.choice(WEIRD_VALUES)
    elif kind == 6:  # replace a whole entry, or the metadata
        target = rng.choice([key, "__metadata__"])
        h[target] = rng.choice(WEIRD_VALUES)
    elif kind == 7:  # shift offsets
        b, e = h[key]["data_offsets"]
        d = rng.choice([-8, -4, -2, -1, 1, 2, 4, 8, 2 ** 40])
        h[key]["data_offsets"] = rng.choice([[b + d, e + d], [b, e + d], [b + d, e]])
    else:  # swap a shape or add a dimension
        h[key]["shape"] = list(reversed(h[key]["shape"])) + rng.choice([[], [1], [0], [2]])
    return _pack(json.dumps(h).encode(), data)


def test_fuzz_header_in_process(tmp_path):
    header, data = _valid(tmp_path)
    rng = random.Random(SEED)
    src = tmp_path / "case.safetensors"
    out = tmp_path / "out.safetensors"
    expected = sorted(["valid.safetensors", "case.safetensors"])
    outcomes = {"converted": 0, "refused": 0}
    for i in range(CASES):
        blob = _mutate(rng, header, data)
        src.write_bytes(blob)
        try:
            convert_file(str(src), str(out), ConvertOptions(num_iter=0, calib_samples=0))
            outcomes["converted"] += 1
            load_dequantized_state_dict(str(out))  # what was written reads back
            os.unlink(out)
        except ConversionError as e:
            assert "case.safetensors" in str(e) and "\n" not in str(e), (i, str(e))
            outcomes["refused"] += 1
        except Exception as e:  # anything else would be a traceback on the command line
            pytest.fail(f"case {i}: {type(e).__name__}: {e}\nfile: {blob[:300]!r}")
        assert sorted(os.listdir(tmp_path)) == expected, (i, os.listdir(tmp_path))
    assert outcomes["refused"] > CASES // 2 and outcomes["converted"] > 10, outcomes  # both paths exercised


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_header_on_the_command_line(tmp_path, seed):
    header, data = _valid(tmp_path)
    rng = random.Random(SEED + 1 + seed)
    src = tmp_path / "case.safetensors"
    src.write_bytes(_mutate(rng, header, data))
    p = run_cli("--input", str(src), "--output", str(tmp_path / "out.safetensors"), "--num_iter", "0", "--quiet")
    assert p.returncode in (0, 2) and "Traceback" not in p.stderr, p.stderr
    expected = ["case.safetensors", "valid.safetensors"] + (["out.safetensors"] if p.returncode == 0 else [])
    assert sorted(os.listdir(tmp_path)) == sorted(expected)
