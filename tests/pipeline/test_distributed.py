"""Quantizing across ranks: the pieces on their own, and torchrun with 2 and 3 gloo processes
on the CPU giving the very checkpoint one process writes, failing together, and resuming."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latticequant.cli import main
from latticequant.pipeline.distributed import (
    RankFailedError,
    World,
    assign_owners,
    shard_range,
)

DRIVER = Path(__file__).with_name("distributed_driver.py")


def test_shards_cover_the_windows_once_and_in_order():
    for n, size in itertools.product(range(1, 12), range(1, 5)):
        if n < size:
            with pytest.raises(ValueError, match="--nsamples"):
                shard_range(n, 0, size)
            continue
        shards = [shard_range(n, r, size) for r in range(size)]
        assert [i for s in shards for i in s] == list(range(n))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_owner_balance_against_the_best_assignment():
    """Every layer gets one owner, all ranks agree, and the slowest rank's work is within
    Graham's 4/3 bound of the best assignment found by brute force."""
    g = torch.Generator().manual_seed(0)
    for size in (2, 3):
        for _ in range(30):
            n = int(torch.randint(1, 7, (1,), generator=g))
            costs = {f"l{i}": float(torch.rand(1, generator=g)) + 0.01 for i in range(n)}
            owners = assign_owners(costs, size)
            assert owners == assign_owners(dict(costs), size)
            assert set(owners) == set(costs) and set(owners.values()) <= set(range(size))
            span = max(sum(c for k, c in costs.items() if owners[k] == r) for r in range(size))
            best = min(
                max(sum(c for c, o in zip(costs.values(), choice) if o == r) for r in range(size))
                for choice in itertools.product(range(size), repeat=n)
            )
            assert span <= best * 4 / 3 + 1e-12


def test_ties_go_to_the_rank_with_less_work_so_far():
    loads = [5.0, 0.0]
    assert assign_owners({"a": 1.0}, 2, loads) == {"a": 1}
    assert loads == [5.0, 1.0]


def test_a_single_process_world_exchanges_nothing():
    world = World()
    assert not world.distributed and world.shard(5) == range(5)
    assert world.all_gather({"x": 1}, "t") == [{"x": 1}]
    assert world.broadcast(3, "t") == 3
    rows = torch.arange(6.0).view(3, 2)
    assert world.gather_rows(rows, [3], "t") is rows
    with pytest.raises(RankFailedError, match="rank 0: broken"):
        world.all_gather(None, "t", error="broken")


def test_world_from_an_environment_without_a_port(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match="RANK or MASTER_PORT .* torchrun"):
        World.from_env()


# -- torchrun --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from tiny import make_char_tokenizer, make_tiny_llama

    from latticequant.pipeline.data import protocol_text

    root = tmp_path_factory.mktemp("dist")
    make_tiny_llama(num_hidden_layers=3).save_pretrained(root / "model")
    make_char_tokenizer().save_pretrained(root / "model")
    (root / "text.txt").write_text(protocol_text()[:6000])
    return root


def _args(files, out, *extra):
    return [
        "quantize",
        str(files / "model"),
        "--bits",
        "3",
        "--group-size",
        "32",
        "--order",
        "act",
        "--nsamples",
        "7",
        "--seqlen",
        "32",
        "--text",
        str(files / "text.txt"),
        "--eval-text",
        str(files / "text.txt"),
        "--eval-seqlen",
        "64",
        "--json",
        "--out",
        str(out),
        *extra,
    ]


def _torchrun(ranks: int, argv: list[str], fail: tuple[int, int, str] = (0, 0, "none")):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={ranks}", str(DRIVER), *map(str, fail), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and len(ta) > 0
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    la, lb = (json.loads((d / "quant_log.json").read_text())["layers"] for d in (a, b))
    assert [x["loss"] for x in la] == [x["loss"] for x in lb]


@pytest.fixture(scope="module")
def single(files, tmp_path_factory):
    """The one-process run everything is compared with."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("one") / "ckpt"
    torch.set_num_threads(1)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(_args(files, out)) == 0
    return out, json.loads(buf.getvalue())


def test_two_ranks_write_the_checkpoint_of_one_process(files, single, tmp_path):
    out = tmp_path / "two"
    proc = _torchrun(2, _args(files, out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(proc.stdout)  # rank 0 alone prints
    _same_checkpoint(single[0], out)
    assert payload["timings"]["ranks"] == 2
    layers = json.loads((out / "quant_log.json").read_text())["layers"]
    assert all(x["row_ranks"] == 2 for x in layers)  # both ranks solved rows of every layer
    for key in ("ppl_before", "ppl_after"):  # perplexity shared out too
        assert payload[key] == pytest.approx(single[1][key], rel=1e-9)


def test_three_ranks_in_small_batches_from_disk(files, single, tmp_path):
    """Uneven shares (2, 2, 3 windows), one window per forward and blocks read from disk."""
    out = tmp_path / "three"
    proc = _torchrun(3, _args(files, out, "--batch-size", "1", "--offload", "--no-eval"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    _same_checkpoint(single[0], out)


def test_a_failing_rank_stops_all_with_its_message_and_the_run_resumes(files, single, tmp_path):
    out = tmp_path / "fail"
    proc = _torchrun(2, _args(files, out, "--no-eval"), fail=(1, 1, "raise"))
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("latticequant: error")]
    assert "latticequant: error: injected failure in block 1" in lines  # rank 1 itself
    assert "latticequant: error: rank 1: injected failure in block 1" in lines  # rank 0
    assert not out.exists() and (tmp_path / "fail.partial").is_dir()
    proc = _torchrun(2, _args(files, out, "--no-eval"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "quant_log.json").read_text())["run"]["blocks_resumed"] == 1
    _same_checkpoint(single[0], out)


def test_a_killed_rank_is_resumed_by_another_number_of_ranks(files, single, tmp_path):
    out = tmp_path / "kill"
    proc = _torchrun(2, _args(files, out, "--no-eval"), fail=(0, 2, "kill"))
    assert proc.returncode != 0
    assert not out.exists()
    proc = _torchrun(3, _args(files, out, "--no-eval"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "quant_log.json").read_text())["run"]["blocks_resumed"] == 2
    _same_checkpoint(single[0], out)


def test_fewer_windows_than_ranks_is_refused_before_the_model_loads(files, tmp_path):
    out = tmp_path / "few"
    argv = _args(files, out, "--no-eval")
    argv[argv.index("--nsamples") + 1] = "1"
    proc = _torchrun(2, argv)
    assert proc.returncode != 0 and not out.exists()
    assert "latticequant: error: 1 calibration windows cannot be shared by 2 ranks" in proc.stderr


@pytest.mark.parametrize("method", ["ssqr", "hptq"])
def test_other_methods_across_ranks(files, tmp_path, method):
    """Methods with outliers or entropy-coded streams exchange their results just as well."""
    import contextlib
    import io

    argv = _args(files, tmp_path / "one", "--method", method, "--no-eval")
    argv.remove("--order")
    argv.remove("act")
    if method == "hptq":  # HPTQ has no grid flags of GPTQ's; keep the shared ones
        for flag in ("--bits", "--group-size"):
            i = argv.index(flag)
            del argv[i : i + 2]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    argv[argv.index("--out") + 1] = str(tmp_path / "two")
    proc = _torchrun(2, argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _same_checkpoint(tmp_path / "one", tmp_path / "two")


def test_objective_and_rotation_across_ranks(files, tmp_path):
    """The cross Gram matrices are reduced over the same tree as the Hessians and the float
    hidden states shared out and gathered like the quantized ones: one process's checkpoint."""
    import contextlib
    import io

    argv = _args(files, tmp_path / "one", "--no-eval", "--objective", "float-outputs")
    argv += ["--rotate", "hadamard", "--batch-size", "2"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    argv[argv.index("--out") + 1] = str(tmp_path / "two")
    proc = _torchrun(2, argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _same_checkpoint(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("objective", ["layer", "float-outputs"])
def test_a_mixture_of_experts_across_ranks(files, tmp_path, objective):
    """Ranks route different tokens to different experts: the counts and the fallbacks are
    decided on the reduced Hessians, so they are those of one process; the weights agree to
    the rounding of expert matmuls over each share's routed rows (with the float-outputs
    objective, the experts' cross Gram matrices and their all-token fallbacks reduced too)."""
    import contextlib
    import io

    from tiny import make_char_tokenizer, make_tiny_moe

    folder = tmp_path / "moe"
    make_tiny_moe("qwen2_moe").save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)
    argv = _args(files, tmp_path / "one", "--no-eval", "--min-expert-tokens", "40")
    argv += ["--objective", objective]
    argv[1] = str(folder)
    argv[argv.index("--group-size") + 1] = "16"  # the shared expert is 48 wide,
    argv[argv.index("--bits") + 1] = "4"  # which 3-bit packing cannot take
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    log = json.loads((tmp_path / "one" / "quant_log.json").read_text())
    assert any(e.get("expert_fallback") == "all-tokens" for e in log["layers"])
    argv[argv.index("--out") + 1] = str(tmp_path / "two")
    proc = _torchrun(2, argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = json.loads((tmp_path / "two" / "quant_log.json").read_text())
    counts = {e["name"]: e.get("expert_tokens") for e in log["layers"]}
    assert counts == {e["name"]: e.get("expert_tokens") for e in two["layers"]}
    assert [e.get("expert_fallback") for e in log["layers"]] == [
        e.get("expert_fallback") for e in two["layers"]
    ]
    # an expert's matmul runs over the routed rows of each share: equal to float rounding.
    # With float-outputs, the float hidden states block 0 hands on differ by that rounding,
    # which each of block 1's targets carries (through C - H~) and which flips a few codes: in
    # a small expert a flip or two moves its loss by some per cent (how many depends on the
    # CPU's float rounding), the sum over all layers far less
    rel = 1e-4 if objective == "layer" else 1e-1
    for a, b in zip(log["layers"], two["layers"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=rel), a["name"]
    total = [sum(e["loss"] for e in side["layers"]) for side in (log, two)]
    assert total[1] == pytest.approx(total[0], rel=1e-4 if objective == "layer" else 1e-3)
    ta, tb = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert ta.keys() == tb.keys()
    for k in ta:
        if objective == "float-outputs":  # block 0's inputs are the same on both sides
            assert not k.startswith("model.layers.0.") or torch.equal(ta[k], tb[k]), k
        elif ta[k].is_floating_point():
            torch.testing.assert_close(tb[k], ta[k], rtol=1e-3, atol=1e-5)
        else:
            assert (ta[k] == tb[k]).double().mean() > 0.99, k


@pytest.mark.parametrize(
    ("ranks", "method", "extra"),
    [
        (3, "rtn", []),
        (3, "babai", []),
        (2, "kbest", ["--beam", "2", "--klein-paths", "3", "--refine", "cd,scales"]),
        (3, "kbest", ["--beam", "2", "--klein-paths", "3"]),
        (3, "gptq", ["--objective", "float-outputs", "--batch-size", "2"]),
    ],
    ids=["rtn-3", "babai-3", "kbest-refine-2", "kbest-klein-3", "float-outputs-3"],
)
def test_every_grid_method_splits_rows_across_ranks(files, tmp_path, ranks, method, extra):
    """Each layer's row blocks are shared by all ranks (4 blocks of 16 rows over 3 ranks for
    q_proj, 2 for k/v_proj), the float-outputs target made block by block too: the checkpoint
    of one process, byte for byte."""
    import contextlib
    import io

    argv = _args(files, tmp_path / "one", "--method", method, "--no-eval", *extra)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    argv[argv.index("--out") + 1] = str(tmp_path / "many")
    proc = _torchrun(ranks, argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _same_checkpoint(tmp_path / "one", tmp_path / "many")
    for f in sorted((tmp_path / "one").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "many" / f.name).read_bytes()
    layers = json.loads((tmp_path / "many" / "quant_log.json").read_text())["layers"]
    assert max(x["row_ranks"] for x in layers) == ranks
