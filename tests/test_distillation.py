"""train.teacher (optimization/objective.py): a model learns a trained model's probabilities over the next tokens,
an ensemble's included; the loss and its gradient against an fp64 reference, a run through the loop that ends
nearer its teacher than the same run without one, its exact resume, and the teachers it refuses."""

from __future__ import annotations

import re
import signal

import pytest
import torch

from fasttrain import Trainer
from fasttrain.config import ModelConfig, load_config
from fasttrain.evaluation.trained_model import load_trained
from fasttrain.model.ensemble import build_model
from fasttrain.optimization.objective import NextTokenLoss, batch_loss
from fasttrain.system.errors import UsageError
from fasttrain.training.trainer import Interrupted
from tests.conftest import tiny_config
from tests.test_checkpoint import EXACT, plant


def tiny(members: int = 1, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(vocab_size=67, max_seq_len=24, d_model=32, n_layers=2, n_heads=2, members=members))


@pytest.mark.parametrize("weight", [1.0, 0.3])
@pytest.mark.parametrize("members", [1, 2], ids=["student", "ensemble-student"])
def test_the_loss_and_its_gradient_are_distillations_against_an_fp64_reference(weight, members):
    """weight x the cross-entropy against an ensemble teacher's mean probabilities + (1 - weight) x the next-token
    loss, summed over the targets that count, pads none; its gradient too. Computed in fp32, compared with the
    formula written out in fp64."""
    teacher, student = tiny(members=3, seed=1).eval(), tiny(members, seed=2)
    tokens, targets = torch.randint(0, 67, (3, 17)), torch.randint(0, 67, (3, 17))
    targets[1, :5] = -100  # pads count for nothing
    sums = batch_loss(NextTokenLoss(student, teacher_weight=weight), tokens, targets, None, teacher=teacher)
    sums.loss.backward()

    reference = student.double()
    reference.zero_grad()
    valid = targets != -100
    with torch.no_grad():
        probs = teacher.double()(tokens).exp()  # an ensemble's logits are log mean probabilities
    parts = [reference] if members == 1 else list(reference.members)
    total = torch.zeros((), dtype=torch.float64)
    for part in parts:
        log_q = part(tokens).log_softmax(-1)
        soft = -(probs * log_q).sum(-1)
        hard = -log_q.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        total = total + ((weight * soft + (1 - weight) * hard) * valid).sum() / len(parts)
    total.backward()
    assert sums.loss.item() == pytest.approx(total.item(), rel=1e-5)
    assert sums.counted.item() == valid.sum().item()
    for (name, ours), theirs in zip(student.named_parameters(), reference.parameters()):
        assert ours.grad is not None and theirs.grad is not None
        assert torch.allclose(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-6), name


def trained(data, out, *sets: str) -> Trainer:
    trainer = Trainer(tiny_config(data, out, "train.sample_tokens=0", *sets), quiet=True)
    trainer.train()
    return trainer


def kl_to(teacher: torch.nn.Module, student: torch.nn.Module, tokens: torch.Tensor) -> float:
    """KL(teacher || student) per token on `tokens`."""
    with torch.no_grad():
        p, q = teacher(tokens).log_softmax(-1), student(tokens).log_softmax(-1)
        return (p.exp() * (p - q)).sum(-1).mean().item()


def test_a_student_trained_through_the_loop_ends_nearer_its_ensemble_teacher(pydoc_data, tmp_path):
    """The teacher: a run of two members' final/; the student, one model of another shape, trains on its
    probabilities and ends one model, nearer the teacher than the same run on the next tokens alone."""
    trained(pydoc_data, tmp_path / "teacher", "model.members=2", "train.max_steps=30")
    teacher = load_trained(tmp_path / "teacher").model
    shape = ["model.n_layers=1", "train.max_steps=20"]
    alone = trained(pydoc_data, tmp_path / "alone", *shape)
    teaching = f'train.teacher="{tmp_path / "teacher" / "final"}"'
    trained(pydoc_data, tmp_path / "student", *shape, teaching)
    student = load_trained(tmp_path / "student")
    assert student.cfg.model.members == 1 and student.cfg.model.n_layers == 1
    tokens = next(alone.loader("val", "sequential", 0, whole=True))[0]
    near, far = kl_to(teacher, student.model, tokens), kl_to(teacher, alone.model.eval(), tokens)
    assert near < 0.8 * far, (near, far)


@pytest.mark.parametrize("init", [False, True], ids=["fresh", "teacher-init"])
def test_a_resumed_student_is_bitwise_an_uninterrupted_one(pydoc_data, tmp_path, init):
    """Resumed, a student started from its teacher's weights takes its save's, not the teacher's again."""
    trained(pydoc_data, tmp_path / "teacher", "train.max_steps=6")
    sets = [*EXACT, f'train.teacher="{tmp_path / "teacher"}"', "train.teacher_weight=0.5"]
    sets.append(f"train.teacher_init={str(init).lower()}")
    straight = trained(pydoc_data, tmp_path / "straight", *sets)
    interrupted = Trainer(tiny_config(pydoc_data, tmp_path / "resumed", *sets), quiet=True)
    plant(interrupted, {5}, lambda t: signal.raise_signal(signal.SIGINT))
    with pytest.raises(Interrupted):
        interrupted.train()
    resumed = Trainer(tiny_config(pydoc_data, tmp_path / "resumed", *sets), quiet=True)
    resumed.resume("auto")
    resumed.train()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_teacher_missing_or_of_another_tokenizer_is_refused_before_the_run_writes(
    pydoc_data, paragraph_data, tmp_path
):
    with pytest.raises(UsageError, match=re.escape("--set: train.teacher_weight: must be in (0, 1], got 0")):
        load_config(None, ["train.teacher_weight=0"])
    with pytest.raises(UsageError, match=r"^train.teacher: .*nowhere: no such run directory"):
        Trainer(tiny_config(pydoc_data, tmp_path / "run", f'train.teacher="{tmp_path / "nowhere"}"'), quiet=True)
    trained(pydoc_data, tmp_path / "teacher", "train.max_steps=2")
    # The same tokenizer but another model.vocab_size (a teacher padded to 600, a student of 515): one line, not the
    # loss's shape error deep in the first step
    for student in ("model.vocab_size=600", "model.vocab_size=515"):
        with pytest.raises(
            UsageError, match=r"^train.teacher: .*final: its model.vocab_size is 512, this model's (600|515):"
        ):
            Trainer(tiny_config(pydoc_data, tmp_path / "run", student, f'train.teacher="{tmp_path / "teacher"}"'))
    (tmp_path / "teacher" / "final" / "tokenizer.json").write_text((paragraph_data / "tokenizer.json").read_text())
    with pytest.raises(UsageError, match=r"^train.teacher: .*tokenizer.json is not the data's tokenizer"):
        Trainer(tiny_config(pydoc_data, tmp_path / "run", f'train.teacher="{tmp_path / "teacher"}"'), quiet=True)
    assert not (tmp_path / "run").exists()


def test_teacher_init_starts_the_student_at_the_first_members_weights(pydoc_data, tmp_path):
    """train.teacher_init: before a step, every tensor of the student is the teacher's first member's, so its logits
    are that member's; a teacher of another width is refused in one line naming the tensor, before the run writes;
    without a teacher the setting does nothing, and the plan records it so."""
    trained(pydoc_data, tmp_path / "teacher", "model.members=2", "train.max_steps=4")
    member = load_trained(tmp_path / "teacher").model.members[0]
    teaching = [f'train.teacher="{tmp_path / "teacher" / "final"}"', "train.teacher_init=true"]
    student = Trainer(tiny_config(pydoc_data, tmp_path / "student", *teaching), quiet=True)
    theirs = member.state_dict()
    for name, tensor in student.model.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
    tokens = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.equal(student.model.eval()(tokens), member.eval()(tokens))
    wider = ["model.d_model=64", "model.n_heads=4"]
    with pytest.raises(
        UsageError, match=r"^train.teacher_init: the model's embed.weight \(512, 64\) is not in the teacher"
    ):
        Trainer(tiny_config(pydoc_data, tmp_path / "wider", *teaching, *wider), quiet=True)
    assert not (tmp_path / "wider").exists()
    alone = Trainer(tiny_config(pydoc_data, tmp_path / "alone", "train.teacher_init=true"), quiet=True)
    assert not alone.cfg.train.teacher_init  # no teacher to start from: the plan records false


def test_the_sizing_times_a_students_step_with_its_teachers_forward(pydoc_data, tmp_path):
    """A budgeted student of n_layers = 0 was sized at the speed of a step without its teacher: with a 4 x 256 teacher
    of a 1 x 64 student the plan counted on 6.4x the tokens the run then read (a review's finding). The timing's loss
    is the student's distillation loss, the teacher's forward in it."""
    from fasttrain.planning.timed_pass import timed_loss

    cfg = tiny_config(pydoc_data, tmp_path, "train.sample_tokens=0", "model.vocab_size=512")
    student, teacher = build_model(cfg.model), build_model(cfg.model)
    calls = []
    teacher.register_forward_hook(lambda module, inputs, output: calls.append(output.shape))
    x = torch.randint(0, cfg.model.vocab_size, (2, 9))
    plain = timed_loss(cfg, torch.device("cpu"))(student)(x[:, :-1], x[:, 1:])
    taught = timed_loss(cfg, torch.device("cpu"), teacher)(student)(x[:, :-1], x[:, 1:])
    assert calls == [torch.Size([2, 8, cfg.model.vocab_size])] and not torch.equal(plain, taught)
    taught.backward()  # timed as the run steps: forward, backward
