"""Weight inheritance and hybrid distillation through the shared trainer (LiT student, DiT teacher)."""

import csv

import pytest
import torch
from helpers import TINY_DIT, train_config

from diffusion.trainer import load_checkpoint, train

TINY_LIT = {"name": "lit", "size": "S", "depth": 2, "hidden_size": 64, "num_heads": 2, "patch_size": 2}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher")
    train(train_config(run, TINY_DIT + ["train.steps=2"]))
    return run


def test_lit_inherits_dit_weights_except_attention(teacher_dir, tmp_path):
    train(train_config(tmp_path, [f"init_from={teacher_dir}", "train.steps=0"], TINY_LIT))
    dit, lit = load_checkpoint(teacher_dir)["ema"], load_checkpoint(tmp_path)["model"]
    inherited = [k for k in lit if ".attn." not in k]
    assert inherited and all(torch.equal(lit[k], dit[k]) for k in inherited)
    assert {k for k in lit if ".attn." in k} == {f"blocks.{i}.attn.{p}" for i in range(2)
                                                  for p in ("q.weight", "q.bias", "kv.weight", "kv.bias",
                                                            "dwc.weight", "dwc.bias", "proj.weight", "proj.bias")}


def test_distillation_adds_the_teacher_term_and_nothing_without_teacher(teacher_dir, tmp_path):
    train(train_config(tmp_path / "d", [f"distill.teacher={teacher_dir}", "train.steps=2"], TINY_LIT))
    with open(tmp_path / "d" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(float(r["distill"]) > 0 for r in rows)
    for r in rows:
        assert float(r["loss"]) == pytest.approx(float(r["mse"]) + float(r["vb"]) + float(r["distill"]), rel=1e-4)
    train(train_config(tmp_path / "n", ["train.steps=2"], TINY_LIT))
    with open(tmp_path / "n" / "log.csv") as f:
        assert all(float(r["distill"]) == 0 for r in csv.DictReader(f))



def test_teacher_and_student_see_identical_dropped_labels(teacher_dir, tmp_path):
    """Labels are dropped once per batch by the trainer; the teacher gets exactly the student's labels."""
    from diffusion.trainer import build_run, train_step

    cfg = train_config(tmp_path, [f"distill.teacher={teacher_dir}", "train.class_dropout_prob=0.5",
                                  "train.batch_size=32"], TINY_LIT)
    run = build_run(cfg)
    seen = {"student": [], "teacher": []}

    def recorder(name):
        def hook(module, args, kwargs):
            seen[name].append((args[2] if len(args) > 2 else kwargs["y"]).clone())
        return hook

    run.model.register_forward_pre_hook(recorder("student"), with_kwargs=True)
    run.teacher.register_forward_pre_hook(recorder("teacher"), with_kwargs=True)
    for _ in range(3):
        train_step(run)
    null = run.model.num_classes
    assert len(seen["student"]) == len(seen["teacher"]) == 3
    for s, t in zip(seen["student"], seen["teacher"]):
        assert torch.equal(s, t)
    dropped = torch.cat(seen["student"]) == null
    assert 0.3 < dropped.float().mean() < 0.7  # dropout really happened (p = 0.5), and the same for both
