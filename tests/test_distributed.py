"""Data-parallel scoring with torch.distributed (gloo, 2 CPU processes) equals one process."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import build
from helpers import EXAMPLES
from safetensors.torch import load_file

from eigenprune.core.batching import encode
from eigenprune.edits.decompose import decompose_targets
from eigenprune.edits.scoring import ScoreConfig, score
from eigenprune.edits.targets import find_targets

CONFIGS = {"sampled": ScoreConfig(partners=2, window=4, batch_size=2),
           "exact": ScoreConfig(partners="all", batch_size=3)}


def _score(config_name):
    model, tok = build("llama")
    targets = find_targets(model, "all")
    return score(model, targets, decompose_targets(model, targets), encode(tok, EXAMPLES * 3), tok.pad_token_id,
                 CONFIGS[config_name], progress=False)


def _worker(rank, world, init_file, out, config_name):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = _score(config_name)
        if rank == 0:
            torch.save({"max": result.max, "mean": result.mean, "n_pairs": result.n_pairs,
                        "sums": result.means.sums, "counts": result.means.counts}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_two_processes_give_the_single_process_scores(tmp_path, config_name):
    out = tmp_path / "scores.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out), config_name), nprocs=2, join=True)
    got = torch.load(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: another thread count reorders float sums (an earlier test may set it)
    try:
        want = _score(config_name)
    finally:
        torch.set_num_threads(threads)
    assert got["n_pairs"] == want.n_pairs
    for name in want.max:
        assert torch.equal(got["max"][name], want.max[name])
        torch.testing.assert_close(got["mean"][name], want.mean[name], atol=1e-7, rtol=1e-6)
    for m in want.means.sums:
        torch.testing.assert_close(got["sums"][m], want.means.sums[m], atol=1e-9, rtol=1e-12)
    assert torch.equal(got["counts"], want.means.counts)


def test_torchrun_cli(tmp_path, saved_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a} + {a} =", "answer": f" {2 * a}"}) + "\n" for a in range(10)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["score", "--model", str(saved_model_dir), "--data", str(data), "--quiet", "--batch-size", "2"]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "eigenprune",
                    *common, "--out", str(tmp_path / "two")], check=True, env=env, capture_output=True)
    subprocess.run([sys.executable, "-m", "eigenprune", *common, "--out", str(tmp_path / "one")], check=True,
                   env=env, capture_output=True)
    one, two = load_file(tmp_path / "one" / "scores.safetensors"), load_file(tmp_path / "two" / "scores.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        assert torch.equal(one[name], two[name])
