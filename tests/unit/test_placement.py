"""Which device(s) each generation process gets — pure functions, no GPU needed."""

from __future__ import annotations

import os

import pytest

from data_prep import generate, pipeline, score
from data_prep.common import Launch, Placement, launcher_ranks, place, visible_gpus


def test_visible_gpus_reads_cuda_visible_devices_before_counting():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3,5, 6"}, count=lambda: 8) == ["3", "5", "6"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, count=lambda: 8) == []  # hidden on purpose: CPU
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}, count=lambda: 8) == []
    assert visible_gpus({}, count=lambda: 2) == ["0", "1"]
    assert visible_gpus({}, count=lambda: 0) == []


def test_launcher_ranks_deepspeed_torchrun_and_none():
    deepspeed = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "4"}
    torchrun = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert launcher_ranks(deepspeed) == launcher_ranks(torchrun) == Launch(5, 8, 1, 4)
    assert launcher_ranks({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}) == Launch(0, 2, 0, 2)
    assert launcher_ranks({"WORLD_SIZE": "2"}) is None and launcher_ranks({}) is None


@pytest.mark.parametrize(
    "index, procs, tp, gpus, expected",
    [
        (0, 1, 1, ["0", "1", "2", "3"], ("0",)),  # a lone process: the first GPU
        (2, 4, 1, ["0", "1", "2", "3"], ("2",)),  # one GPU per process
        (2, 4, 2, [str(g) for g in range(8)], ("4", "5")),  # TP 2: GPUs [2·2, 3·2)
        (1, 2, 2, ["3", "5", "6", "7"], ("6", "7")),  # slices of what is visible, not of 0..n
        (0, 1, 4, [str(g) for g in range(8)], ("0", "1", "2", "3")),
    ],
)
def test_each_process_gets_its_own_gpus(index, procs, tp, gpus, expected):
    placement = place(index, procs, tp, gpus)
    assert placement.gpus == expected
    assert placement.env() == {"CUDA_VISIBLE_DEVICES": ",".join(expected)}


def test_every_gpu_used_once_by_p_processes():
    gpus = [str(g) for g in range(8)]
    used = [g for i in range(4) for g in place(i, 4, 2, gpus).gpus]
    assert sorted(used, key=int) == gpus


def test_cpu_processes_split_the_cores():
    assert place(0, 1, 1, [], cpus=16) == Placement((), None)  # one process: torch's own default
    assert place(1, 4, 1, [], cpus=16) == Placement((), 4)
    assert place(2, 3, 1, [], cpus=2).env() == {"OMP_NUM_THREADS": "1"}  # never 0 threads


@pytest.mark.parametrize(
    "index, procs, tp, gpus, message",
    [
        (0, 1, 4, ["0", "1"], r"--tensor-parallel-size 4 is larger than the 2 visible GPU\(s\) \(0,1\)"),
        (
            0,
            3,
            2,
            ["0", "1", "2", "3"],
            r"3 processes × tensor-parallel size 2 need 6 GPUs but 4 are visible .* use --procs 2",
        ),
        (0, 2, 1, ["0"], r"2 processes × tensor-parallel size 1 need 2 GPUs but 1 are visible"),
        (0, 1, 2, [], r"--tensor-parallel-size 2 needs GPUs and none is visible"),
        (0, 1, 0, ["0"], r"--tensor-parallel-size 0: must be >= 1"),
        (2, 2, 1, ["0", "1"], r"process 2 of 2"),
    ],
)
def test_impossible_placements_are_one_line(index, procs, tp, gpus, message):
    with pytest.raises(ValueError, match=message) as err:
        place(index, procs, tp, gpus)
    assert "\n" not in str(err.value)


def test_pipeline_pins_each_child_and_passes_every_generation_flag(monkeypatch):
    args = pipeline.parser().parse_args(
        ["--model", "m", "--prompts", "p.jsonl", "--out", "o", "--reward", "x:y", "--procs", "2",
         "--engine", "vllm", "--tensor-parallel-size", "2", "--batch-prompts", "4", "--max-model-len", "512"]
    )  # fmt: skip
    cmd = pipeline.child_command(args, "o/candidates", 1)
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert (
        flags["--shard"] == "1/2" and flags["--tensor-parallel-size"] == "2" and flags["--engine"] == "vllm"
    )
    assert (
        flags["--batch-prompts"] == "4" and flags["--max-model-len"] == "512" and flags["--dtype"] == "auto"
    )
    # every flag a child gets is a generate flag, so the child's own parser accepts the command
    generate.parser().parse_args(cmd[3:])


def test_pipeline_passes_chat_template_kwargs_to_its_children_as_json():
    base = ["--model", "m", "--prompts", "p.jsonl", "--out", "o", "--reward", "x:y", "--procs", "2"]
    args = pipeline.parser().parse_args([*base, "--chat-template-kwargs", '{"enable_thinking": false}'])
    cmd = pipeline.child_command(args, "o/candidates", 0)
    assert cmd[cmd.index("--chat-template-kwargs") + 1] == '{"enable_thinking": false}'
    assert generate.parser().parse_args(cmd[3:]).chat_template_kwargs == {"enable_thinking": False}
    rm_options = score.scorer_options(args)  # the reward model's template gets them too
    assert rm_options["chat_template_kwargs"] == {"enable_thinking": False}
    assert "--chat-template-kwargs" not in pipeline.child_command(pipeline.parser().parse_args(base), "o", 0)


def test_pin_process_under_the_launcher_takes_the_local_ranks_gpus(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_SIZE", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.setattr(generate.torch.cuda, "is_available", lambda: True)
    assert generate.pin_process(tp=2) == "cuda:0"  # the process now sees only its own two GPUs
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_pin_process_on_the_cpu_changes_nothing(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert generate.pin_process(tp=1) == "cpu"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_pipeline_refuses_procs_below_one_and_too_many_gpus(tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    base = ["--model", "m", "--prompts", "p.jsonl", "--out", str(tmp_path), "--reward", REWARD]
    with pytest.raises(SystemExit, match=r"^pipeline: error: --procs 0: must be >= 1$"):
        pipeline.main([*base, "--procs", "0"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(
        SystemExit, match=r"3 processes × tensor-parallel size 1 need 3 GPUs but 2 are visible"
    ):
        pipeline.main([*base, "--procs", "3"])


REWARD = "data_prep.tasks.sort_task:reward"
