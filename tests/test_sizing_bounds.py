"""Issue 82, item 1: a self-sized plan the machine cannot hold. A dry run of a long train.max_time on a small corpus
chose the deepest shapes (slow enough to read the corpus fewer times) whatever their size, and timed them: 140M
parameters for 0.8M tokens, and a timing of 8 hours that the kernel's out-of-memory killer ended. The sizing now
offers, and times, only the shapes whose memory estimate fits the device with margin (sizing.MEMORY_SHARE) and,
under a time budget, whose parameters the corpus can feed (data.max_epochs epochs / FED_TOKENS_PER_PARAM), and its note
says which bound held. Each case failed before the fix."""

from __future__ import annotations

import json
import re
from dataclasses import replace

from fasttrain import train as train_module
from fasttrain.config import load_config
from fasttrain.planning import preflight, sizing
from fasttrain.planning.sizing import Speed
from fasttrain.preparation.preparation import prepare
from tests.conftest import tiny_args, tiny_overrides
from tests.test_reliability_round8 import command
from tests.test_sizing import AUTO, depth_in

# Three days on a machine whose FLOP/s do not depend on the size: every depth is affordable, and only the deepest
# would read the corpus no more than data.max_epochs times in that budget
DAYS = [*AUTO, "data.vocab_size=0", "train.max_steps=0", f"train.max_time={3 * 24 * 3600}"]
SLOW = Speed(((1e6, 1e9),))


def fake_calibration(monkeypatch) -> list[int]:
    """sizing.calibrate made SLOW at once, the depths it is asked to time appended to the list returned."""
    timed: list[int] = []

    def calibrate(cfg, device, update=None, loss=None, depths=()):
        timed.extend(depths)
        return SLOW

    monkeypatch.setattr(sizing, "calibrate", calibrate)
    return timed


def test_a_budget_of_days_on_a_small_corpus_plans_what_the_device_and_the_data_hold(
    code_data, tmp_path, monkeypatch, capsys
):
    """5ac3164 chose (and would have timed) depth 17, 245M parameters, for a corpus of 18K training tokens."""
    fake_calibration(monkeypatch)
    # the fixed rule: "repeats" would lower the epoch limit below data.max_epochs on this new text (test_repeats)
    args = [*tiny_args(code_data, tmp_path, *DAYS, 'optim.weight_decay_rule="fixed"'), "--dry-run"]
    code, out, err = command(train_module.main, args, capsys)
    assert code == 0, err
    code, plan, err = command(train_module.main, [*args, "--json"], capsys)
    assert code == 0, err
    plan = json.loads(plan)
    params = float(re.search(r"([\d.]+)M parameters in matmuls", out).group(1)) * 1e6
    fed = 10 * plan["train_tokens"] / sizing.FED_TOKENS_PER_PARAM  # data.max_epochs epochs of it
    assert params <= fed, out
    assert plan["memory_bytes"] <= sizing.MEMORY_SHARE * plan["available_bytes"]
    assert re.search(r"the rule would choose depth \d+, but .*its [\d.]+M parameters are more than 10 epochs", out)
    assert "every depth offered would read the corpus more than 10 times (the epoch limit)" in out


def test_no_shape_over_the_memory_bound_is_timed_or_chosen(pydoc_data, tmp_path, monkeypatch, capsys):
    """A device with 40 MiB available, and no data bound (data.max_epochs far out): calibrate is asked for no depth
    whose memory estimate is over half of it (5ac3164 timed depth 3, which the rule chooses), and the plan's note
    says that memory held the choice."""
    timed = fake_calibration(monkeypatch)
    room = 40 << 20
    monkeypatch.setattr(preflight, "available_bytes", lambda device: room)
    args = [*tiny_args(pydoc_data, tmp_path, *DAYS, "data.max_epochs=1e6"), "--dry-run"]
    code, out, err = command(train_module.main, args, capsys)
    assert code == 0, err
    cfg = load_config("configs/base.toml", [*tiny_overrides(pydoc_data, tmp_path), *DAYS, "model.vocab_size=512"])

    def need(depth: int) -> int:
        shape = sizing.ladder_shape(cfg.model, depth)
        return sum(preflight.estimate_bytes(replace(cfg, model=shape), 4).values())  # fp32, as the tiny runs

    assert timed and all(need(d) <= room / 2 for d in timed), timed
    depth = depth_in(out)
    assert need(depth) <= room / 2 < need(depth + 1)  # the deepest the bound allows: the rule wants deeper
    assert re.search(r"the rule would choose depth \d+, but its memory estimate is over 50% of what the device", out)
    near = re.search(r"a speed 20% off would choose depth ([\d or]+),", out)  # it named depth 28 on a 24 GB machine
    assert all(need(int(d)) <= room / 2 for d in (near.group(1).split(" or ") if near else []))


# Item 4: a dry run before the data is prepared plans the model the run trains once it is.


def test_a_dry_run_before_the_data_is_prepared_plans_the_shape_and_context_after(tmp_path, monkeypatch, capsys):
    """The plan of a folder not prepared yet estimates its tokens from the inputs' bytes: its context is the one
    planned once it is prepared, its shape at most that one (new text assumed). 5ac3164 planned it as an unlimited
    corpus: another depth, at context 512 where the prepared corpus trains at 256."""
    from pydoc_data.topics import topics

    texts = tmp_path / "texts"
    texts.mkdir()
    for name in sorted(topics)[::2]:  # ~90K training tokens: not near an edge of the data bound
        (texts / f"{name}.txt").write_text(topics[name])
    fake_calibration(monkeypatch)
    folder = tmp_path / "prepared"
    sets = [*DAYS, "data.vocab_size=512", f'data.inputs=["{texts}"]', "train.seq_len=0", "model.max_seq_len=512"]
    args = [*tiny_args(folder, tmp_path / "run", *sets), "--dry-run"]
    code, before, err = command(train_module.main, args, capsys)
    assert code == 0, err
    assert not folder.exists()  # a dry run writes nothing
    assert re.search(r"the data is not prepared yet: the model's shape and context are planned for ~[\d.]+M", before)
    prepare([str(texts)], folder, vocab_size=512, quiet=True)
    code, after, err = command(train_module.main, args, capsys)
    assert code == 0, err
    assert "not prepared yet" not in after
    # planned as new text (the 4-epoch limit), where the topics repeat themselves (12% of their validation spans are
    # in the training text: 7.5 epochs once measured): the estimate leans to a smaller model, and says so
    assert depth_in(before) <= depth_in(after)
    assert "assumed until the data is prepared; a text that repeats itself lets the run read it more" in before
    context = re.compile(r"train\.seq_len = 0: (\d+) ")
    assert context.search(before).group(1) == context.search(after).group(1) == "256", (before, after)
