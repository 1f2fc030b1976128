"""The v2 slow reply (``serve_app.offline.checked``): a first pass, a check that finds a slip and
redoes from it, what the trainer masks, and the self-correction table ``kvswitch eval`` reports."""

import random

import pytest
import torch

from serve_app.core.task import Problem, TaskConfig, is_correct, sample_problem
from serve_app.offline import checked
from serve_app.offline.checked import (CheckSlip, Slip, checked_reply, checked_thought, first_pass_value, sample_check_slip,
                                      sample_double_slip, sample_operation_slip, sample_slip, self_correction)
from serve_app.offline.embedded import build_tokenizer
from serve_app.offline.train import TrainConfig, checked_example, sample_batches, sample_training_problem, weighted_loss

P = Problem((91, 5, 59), ("-", "+"))  # 91 - 5 + 59 = 145


def test_a_right_first_pass_is_confirmed_step_by_step():
    text, masked = checked_thought(P)
    assert masked == []
    assert text == ("91 - 5: 11-5=6, 9-0-1=8, so 86\n"
                    "86 + 59: 6+9=15, 8+5+1=14, so 145\n"
                    "So the first pass gives 145.\n"
                    "Let me check each step.\n"
                    "Step 1 took 91 to 86. Undo: 86 + 5: 6+5=11, 8+0+1=9, so 91.\n"
                    "Want 91, got 91: 9=9 1=1, so step 1 is right.\n"
                    "Step 2 took 86 to 145. Undo: 145 - 59: 15-9=6, 14-5-1=8, 1-0-1=0, so 86.\n"
                    "Want 86, got 86: 8=8 6=6, so step 2 is right.\n"
                    "Every step checks out, so the answer is 145.\n")
    assert first_pass_value(text) == 145 and is_correct(checked_reply(P), 145)


@pytest.mark.parametrize("slip,wrong_line,redo_from", [
    (Slip(0, "operand", 1, first=True), "1 - 5: 5 - 1 instead, 5-1=4, so -4\n", 91),   # the first number copied as 1
    (Slip(1, "operand", 99), "86 + 99: 6+9=15, 8+9+1=18, so 185\n", 86),              # 59 copied as 99
    (Slip(1, "result", 155), "86 + 59: 6+9=15, 8+5+1=14, so 155\n", 86),              # a result one digit off
    (Slip(1, "result", -145), "86 + 59: 6+9=15, 8+5+1=14, so -145\n", 86),            # a result's sign flipped
])
def test_the_check_finds_the_slip_says_so_and_redoes_from_the_last_right_value(slip, wrong_line, redo_from):
    text, [(a, b)] = checked_thought(P, slip)
    assert text[a:b] == wrong_line
    step = slip.step + 1
    assert f"so step {step} is wrong. Redo from {redo_from}:" in text
    assert text.endswith("So the answer is 145.\n") and first_pass_value(text) != 145
    assert text.count("is right.") == slip.step  # the steps before the slip were confirmed
    assert f"Step {step} took {redo_from} to " in text  # the value to come back to, written before the undo


def test_an_operation_slip_is_found_because_the_undo_inverts_the_questions_operation():
    # the first pass works 86 - 59 where the question reads + 59 (stage 9: `-64 - 36` for `+ 36`)
    text, [(a, b)] = checked_thought(P, Slip(1, "operation", 59))
    assert text[a:b] == "86 - 59: 16-9=7, 8-5-1=2, so 27\n"
    assert "Step 2 took 86 to 27. Undo: 27 - 59: 59 - 27 instead, 9-7=2, 5-2=3, so -32.\n" in text  # - 59, not + 59
    assert text.endswith("Want 86, got -32: 8 vs -, so step 2 is wrong. Redo from 86:\n"
                         "86 + 59: 6+9=15, 8+5+1=14, so 145\n"
                         "So the answer is 145.\n")
    assert first_pass_value(text) == 27


def test_every_sampled_operation_slip_flips_a_nonzero_step_and_is_found():
    rng = random.Random(12)
    steps = set()
    for _ in range(3000):
        p = sample_problem(rng, rng.randint(1, 8), 999, "mixed")
        slip = sample_operation_slip(rng, p)
        if all(x == 0 for x in p.operands[1:]):
            assert slip is None
            continue
        assert slip.kind == "operation" and slip.value == p.operands[slip.step + 1] != 0
        text, [(a, b)] = checked_thought(p, slip)
        other = "-" if p.ops[slip.step] == "+" else "+"
        assert text[a:b].split(":")[0].endswith(f" {other} {slip.value}")  # the slipped line works the other operation
        assert f"so step {slip.step + 1} is wrong. Redo from" in text and text.endswith(f"So the answer is {p.answer}.\n")
        assert first_pass_value(text) != p.answer
        steps.add(slip.step)
    assert steps == set(range(8))
    assert sample_operation_slip(rng, Problem((5, 0, 0), ("+", "-"))) is None


def test_the_trainer_takes_operation_slips_at_their_fraction_and_leaves_other_replies_alone():
    tok = build_tokenizer(seed=0, corpus_size=200)
    base = TrainConfig(reply_format="checked", slip_fraction=1.0, forced_close_fraction=0.0)
    both = base.model_copy(update={"operation_slip_fraction": 0.5})
    rng = random.Random(8)
    flipped = 0
    for _ in range(200):
        p = sample_problem(rng, rng.randint(2, 6), 99)
        ids, labels, _ = checked_example(tok, p, random.Random(rng.random()), both)
        masked = tok.decode([i for i, lab in zip(ids, labels) if lab == -100])
        assert masked.count("\n") == 1 and "is wrong. Redo from" in tok.decode(ids)
        k = tok.decode(ids).split("\n").index(masked.rstrip("\n"))  # the slipped step's line is line k
        flipped += masked.split(":")[0].split(" ")[1] != p.ops[k]  # "acc op x:" with the other operation
    assert 0.35 < flipped / 200 < 0.65  # about half; operand and result slips keep the operation
    p = Problem((43, 27, 93), ("-", "+"))
    assert checked_example(tok, p, random.Random(1), base) == checked_example(tok, p, random.Random(1), base.model_copy(update={"operation_slip_fraction": 0.0}))


def test_the_verdict_compares_character_by_character():
    from serve_app.offline.checked import compare

    assert compare(37, 37) == "3=3 7=7" and compare(0, 0) == "0=0"
    assert compare(37, 27) == "3 vs 2"  # up to the first differing pair
    assert compare(-70, -76) == "-=- 7=7 0 vs 6" and compare(150, -50) == "1 vs -"
    assert compare(5, 50) == "5=5 lengths differ" == compare(50, 5)
    text, _ = checked_thought(P, Slip(1, "operand", 99))
    assert "Want 86, got 126: 8 vs 1, so step 2 is wrong. Redo from 86:" in text


def test_operand_slips_include_a_neighbouring_operand_taken_instead():
    rng = random.Random(11)
    p = Problem((43, 27, 93, 19, 24, 11, 21, 3), ("-", "-", "+", "+", "-", "-", "-"))
    slips = [sample_slip(rng, p) for _ in range(3000)]
    neighbour = [s for s in slips if s.kind == "operand" and not s.first and s.value in p.operands[max(1, s.step):s.step + 3]
                 and s.value != p.operands[s.step + 1]]
    assert 0.13 < len(neighbour) / len(slips) < 0.22  # about a third of the operand half (a digit change rarely lands on one)


@pytest.mark.parametrize("keyed", [False, True])
def test_every_sampled_slip_is_found_and_the_answer_is_always_right(keyed):
    rng = random.Random(5)
    for _ in range(3000):
        p = sample_problem(rng, rng.randint(1, 8), 999, "mixed")
        slip = sample_slip(rng, p)
        text, [(a, b)] = checked_thought(p, slip, keyed)
        assert first_pass_value(text) != p.answer  # a slip always moves the first pass off by its error
        assert "is wrong. Redo from" in text and text.endswith(f"So the answer is {p.answer}.\n")
        assert text[a:b].count("\n") == 1


def test_a_keyed_check_reads_each_operand_from_a_list_of_the_question():
    text, masked = checked_thought(P, keyed=True)
    assert masked == []
    assert text == ("91 - 5: 11-5=6, 9-0-1=8, so 86\n"
                    "86 + 59: 6+9=15, 8+5+1=14, so 145\n"
                    "So the first pass gives 145.\n"
                    "Let me check each step.\n"
                    "The question: start 91, op 1 is - 5, op 2 is + 59.\n"
                    "Step 1 took 91 to 86, op 1 is - 5. Undo: 86 + 5: 6+5=11, 8+0+1=9, so 91.\n"
                    "Want 91, got 91: 9 9 same, 1 1 same, so step 1 is right.\n"
                    "Step 2 took 86 to 145, op 2 is + 59. Undo: 145 - 59: 15-9=6, 14-5-1=8, 1-0-1=0, so 86.\n"
                    "Want 86, got 86: 8 8 same, 6 6 same, so step 2 is right.\n"
                    "Every step checks out, so the answer is 145.\n")
    assert first_pass_value(text) == 145 and is_correct(checked_reply(P, keyed=True), 145)


def test_a_keyed_check_catches_a_neighbouring_operand_and_redoes_with_the_keyed_one():
    p = Problem((40, 7, 52, 3), ("+", "-", "+"))  # 40 + 7 - 52 + 3 = -2
    text, [(a, b)] = checked_thought(p, Slip(1, "operand", 7), keyed=True)  # step 2 took 7 (step 1's operand) for 52
    assert text[a:b].startswith("47 - 7:")
    assert "Step 2 took 47 to 40, op 2 is - 52. Undo: 40 + 52:" in text
    assert "Want 47, got 92: 4 9 differ, so step 2 is wrong. Redo from 47:\nop 2 is - 52: 47 - 52:" in text
    assert "\nop 3 is + 3: -5 + 3:" in text and text.endswith("So the answer is -2.\n")
    heavy = "".join(text[a:b] for a, b in checked.check_spans(text))
    assert "The question: start 40, op 1 is + 7, op 2 is - 52, op 3 is + 3." in heavy
    assert ", op 1 is + 7." in heavy and "Undo" not in heavy and "Step 1 took" not in heavy and "op 3 is + 3: -5 + 3:" in heavy


def test_a_keyed_verdict_writes_each_pair_then_judges_it():
    from serve_app.offline.checked import compare

    assert compare(37, 37, keyed=True) == "3 3 same, 7 7 same" and compare(0, 0, keyed=True) == "0 0 same"
    assert compare(37, 27, keyed=True) == "3 2 differ"
    assert compare(-70, -76, keyed=True) == "- - same, 7 7 same, 0 6 differ" and compare(150, -50, keyed=True) == "1 - differ"
    assert compare(5, 50, keyed=True) == "5 5 same, lengths differ" == compare(50, 5, keyed=True)


def test_a_check_slip_raises_a_false_alarm_that_the_redo_mends_with_the_questions_operand():
    # stage 6's failure: the undo of step 2 took 69 for 59, and the redo copied 69 and broke a right first pass
    text, [(a, b)] = checked_thought(P, judged=True, check_slip=CheckSlip(1, "operand", 69))
    assert text[a:b] == "Undo: 145 - 69: 15-9=6, 14-6-1=7, 1-0-1=0, so 76.\n"
    assert text.endswith("Step 2 took 86 to 145. Undo: 145 - 69: 15-9=6, 14-6-1=7, 1-0-1=0, so 76.\n"
                         "Want 86, got 76: 8 7 differ, so step 2 is wrong. Redo from 86:\n"
                         "86 + 59: 6+9=15, 8+5+1=14, so 145\n"
                         "So the answer is 145.\n")
    assert "Want 91, got 91: 9 9 same, 1 1 same, so step 1 is right." in text
    text, [(a, b)] = checked_thought(P, check_slip=CheckSlip(0, "result", 81))  # stage 5's verdict, an undo's result one digit off
    assert text[a:b] == "Undo: 86 + 5: 6+5=11, 8+0+1=9, so 81.\n"
    assert "Want 91, got 81: 9 vs 8, so step 1 is wrong. Redo from 91:\n91 - 5:" in text and is_correct(checked_reply(P, check_slip=CheckSlip(0, "result", 81)), 145)
    with pytest.raises(ValueError, match="must be at the same step"):
        checked_thought(P, Slip(1, "result", 155), check_slip=CheckSlip(0, "result", 81))


def test_every_sampled_check_slip_is_a_false_alarm_whose_redo_keeps_the_right_answer():
    rng = random.Random(7)
    kinds = {"neighbour": 0, "digit": 0, "result": 0}
    for _ in range(3000):
        p = sample_problem(rng, rng.randint(1, 8), 999, "mixed")
        cs = sample_check_slip(rng, p)
        text, [span] = checked_thought(p, judged=True, check_slip=cs)
        assert first_pass_value(text) == p.answer and f"so step {cs.step + 1} is wrong. Redo from" in text
        assert text.endswith(f"So the answer is {p.answer}.\n") and text.count(" differ, so step") == 1
        masked = text[span[0]:span[1]]
        assert masked.startswith("Undo: ") and masked.endswith(".\n") and text[:span[0]].rsplit("\n", 1)[1].startswith(f"Step {cs.step + 1} took ")
        neighbours = p.operands[max(1, cs.step):cs.step + 3]
        kinds["result" if cs.kind == "result" else "neighbour" if cs.value in neighbours else "digit"] += 1
    assert 0.2 < kinds["result"] / 3000 < 0.3 and 0.12 < kinds["neighbour"] / 3000 < 0.3


def test_keyed_training_replies_fit_the_context_of_the_v2_model():
    tok = build_tokenizer(seed=0, corpus_size=200)
    cfg = TrainConfig(reply_format="checked-keyed", slip_fraction=0.6, check_weight=3.0, max_positions=2048,
                      task=TaskConfig(max_operators=8, max_operand=999, operands="mixed"))
    rng = random.Random(2)
    for _ in range(40):
        p = sample_training_problem(cfg, rng, thinking=True)
        ids, labels, weights = checked_example(tok, p, random.Random(rng.random()), cfg)
        assert len(ids) == len(labels) < cfg.max_positions - 64 and (weights is None or len(weights) == len(ids))
        if weights is not None:  # not a forced close: the keyed list is in the reply and weighs 3
            assert "The question: start" in tok.decode([i for i, w in zip(ids, weights) if w == 3.0])


def test_the_trainer_masks_exactly_the_slipped_line():
    tok = build_tokenizer(seed=0, corpus_size=200)
    cfg = TrainConfig(reply_format="checked", slip_fraction=1.0, forced_close_fraction=0.0)
    rng = random.Random(3)
    for _ in range(20):
        p = sample_problem(rng, rng.randint(2, 6), 99)
        ids, labels, _ = checked_example(tok, p, random.Random(rng.random()), cfg)
        masked = tok.decode([i for i, lab in zip(ids, labels) if lab == -100])
        kept = [i for i, lab in zip(ids, labels) if lab != -100]
        assert masked.endswith("\n") and masked.count("\n") == 1 and " so " in masked  # one step line
        assert tok.decode(kept).endswith(f"{p.answer}<|im_end|>") and "is wrong. Redo from" in tok.decode(kept)


def test_the_trainer_masks_a_check_slips_undo_and_weighs_the_redo_that_mends_it():
    tok = build_tokenizer(seed=0, corpus_size=200)
    cfg = TrainConfig(reply_format="checked-judged", slip_fraction=0.0, forced_close_fraction=0.0, check_slip_fraction=1.0, check_weight=3.0)
    rng = random.Random(4)
    for _ in range(20):
        p = sample_problem(rng, rng.randint(2, 6), 99)
        ids, labels, weights = checked_example(tok, p, random.Random(rng.random()), cfg)
        masked = tok.decode([i for i, lab in zip(ids, labels) if lab == -100])
        kept = tok.decode([i for i, lab in zip(ids, labels) if lab != -100])
        heavy = tok.decode([i for i, w in zip(ids, weights) if w == 3.0])
        assert masked.startswith("Undo:") and masked.count("\n") == 1  # one undo, nothing else
        assert "So the first pass gives" in kept and kept.endswith(f"{p.answer}<|im_end|>")
        assert " differ, so step" in heavy and "Redo from" in heavy and heavy.endswith(f"So the answer is {p.answer}.\n")
    plain = TrainConfig(reply_format="checked-judged", slip_fraction=0.0, forced_close_fraction=0.0)
    ids, labels, _ = checked_example(tok, P, random.Random(0), plain)
    assert -100 not in labels and "9 9 same, 1 1 same, so step 1 is right" in tok.decode(ids)



def test_a_double_slip_masks_both_slips_and_the_redo_reads_the_questions_operand():
    # the first pass took 69 for 59 and the undo of that step took 50: the redo must use 59, neither
    text, [(a, b), (c, d)] = checked_thought(P, Slip(1, "operand", 69), judged=True, check_slip=CheckSlip(1, "operand", 50))
    assert text[a:b] == "86 + 69: 6+9=15, 8+6+1=15, so 155\n"
    assert text[c:d] == "Undo: 155 - 50: 5-0=5, 5-5=0, 1-0=1, so 105.\n"
    assert text.endswith("Step 2 took 86 to 155. Undo: 155 - 50: 5-0=5, 5-5=0, 1-0=1, so 105.\n"
                         "Want 86, got 105: 8 1 differ, so step 2 is wrong. Redo from 86:\n"
                         "86 + 59: 6+9=15, 8+5+1=14, so 145\n"
                         "So the answer is 145.\n")
    assert first_pass_value(text) == 155


def test_every_sampled_double_slip_keeps_the_mismatch_and_uses_neither_wrong_operand():
    rng = random.Random(11)
    neighbour = 0
    for _ in range(3000):
        p = sample_problem(rng, rng.randint(1, 8), 999, "mixed")
        slip = sample_slip(rng, p)
        cs = sample_double_slip(rng, p, slip)
        assert cs is not None and cs.step == slip.step and cs.kind == "operand"
        assert cs.value != p.operands[slip.step + 1] and not (slip.kind == "operand" and not slip.first and cs.value == slip.value)
        text, [(a, b), (c, d)] = checked_thought(p, slip, judged=True, check_slip=cs)
        assert a < b < c < d and text[c:d].startswith("Undo: ") and text[c:d].count("\n") == 1
        assert text.count(" differ, so step") == 1 and f"so step {slip.step + 1} is wrong. Redo from" in text
        assert text.endswith(f"So the answer is {p.answer}.\n") and first_pass_value(text) != p.answer
        neighbour += cs.value in p.operands[max(1, cs.step):cs.step + 3]
    assert 0.15 < neighbour / 3000 < 0.4


def test_the_trainer_masks_both_lines_of_a_double_slip_and_nothing_else():
    tok = build_tokenizer(seed=0, corpus_size=200)
    cfg = TrainConfig(reply_format="checked-judged", slip_fraction=1.0, double_slip_fraction=1.0, forced_close_fraction=0.0)
    rng = random.Random(6)
    for _ in range(20):
        p = sample_problem(rng, rng.randint(2, 6), 99)
        ids, labels, _ = checked_example(tok, p, random.Random(rng.random()), cfg)
        masked = tok.decode([i for i, lab in zip(ids, labels) if lab == -100])
        kept = tok.decode([i for i, lab in zip(ids, labels) if lab != -100])
        assert masked.count("\n") == 2 and "Undo:" in masked and " so " in masked.split("\n")[0]  # a step line, then an undo
        assert kept.endswith(f"{p.answer}<|im_end|>") and "is wrong. Redo from" in kept
        assert kept.count("Undo:") == kept.count("is right.")  # the kept undos are the confirmed steps; the slipped one is masked

def test_forced_closes_happen_after_the_first_pass_of_a_right_reply():
    tok = build_tokenizer(seed=0, corpus_size=200)
    cfg = TrainConfig(reply_format="checked", slip_fraction=0.0, forced_close_fraction=1.0)
    ids, labels, weights = checked_example(tok, P, random.Random(0), cfg)
    assert weights is None
    text = tok.decode(ids)
    assert "So the first pass gives 145." in text and text.endswith("</think>\n\n145<|im_end|>")
    assert labels.count(-100) == len(tok.encode("</think>\n\n", add_special_tokens=False))


def test_fast_examples_include_small_two_operator_questions():
    cfg = TrainConfig(fast_one_operator_fraction=0.5, fast_small_fraction=0.3, task=TaskConfig(max_operators=8, max_operand=999, operands="mixed"))
    rng = random.Random(1)
    fast = [sample_training_problem(cfg, rng, thinking=False) for _ in range(4000)]
    small = sum(p.num_operators == 2 and max(p.operands) <= 9 for p in fast) / len(fast)
    one = sum(p.num_operators == 1 for p in fast) / len(fast)
    assert 0.28 <= small <= 0.34 and 0.47 <= one <= 0.56
    slow = [sample_training_problem(cfg, rng, thinking=True) for _ in range(4000)]
    assert {p.num_operators for p in slow} == set(range(1, 9)) and max(max(p.operands) for p in slow) >= 100


def test_checked_batches_are_well_formed():
    tok = build_tokenizer(seed=0, corpus_size=200)
    cfg = TrainConfig(reply_format="checked", tokens_per_batch=4096, task=TaskConfig(max_operators=8, max_operand=999, operands="mixed"))
    batches = sample_batches(cfg, tok, random.Random(0), pool_size=64)
    for _ in range(3):
        ids, labels, weights = next(batches)
        assert ids.shape == labels.shape == weights.shape and (labels != -100).any() and (weights == 1).all()


def test_check_weight_falls_on_the_verdicts_and_the_redo():
    tok = build_tokenizer(seed=0, corpus_size=200)
    cfg = TrainConfig(reply_format="checked", slip_fraction=1.0, forced_close_fraction=0.0, check_weight=3.0)
    rng = random.Random(5)
    for _ in range(10):
        p = sample_problem(rng, rng.randint(2, 6), 99)
        ids, labels, weights = checked_example(tok, p, random.Random(rng.random()), cfg)
        heavy = tok.decode([i for i, w in zip(ids, weights) if w == 3.0])
        light = tok.decode([i for i, w in zip(ids, weights) if w == 1.0])
        assert set(weights) == {1.0, 3.0}
        assert "so step 1 is " in heavy and "is wrong. Redo from" in heavy and heavy.endswith(f"So the answer is {p.answer}.\n")
        assert "Want" not in light and "Redo" not in light and "So the first pass gives" in light and "Undo:" in light
    right = TrainConfig(reply_format="checked", slip_fraction=0.0, forced_close_fraction=0.0, check_weight=3.0)
    ids, _, weights = checked_example(tok, P, random.Random(0), right)
    assert "Every step checks out" in tok.decode([i for i, w in zip(ids, weights) if w == 1.0])


def test_weighted_loss_is_the_models_loss_with_unit_weights_and_follows_the_weights():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[-100, 3, 4, 5, -100, -100], [-100, -100, 1, 2, 3, 4]])
    ones = torch.ones(2, 6)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="none")
    assert torch.allclose(weighted_loss(logits, labels, ones), ce[labels[:, 1:].reshape(-1) != -100].mean())
    w = ones.clone()
    w[1, 5] = 4.0  # the last target counts four times
    valid = ce[labels[:, 1:].reshape(-1) != -100]
    assert torch.allclose(weighted_loss(logits, labels, w), (valid.sum() + 3 * valid[-1]) / (len(valid) + 3))


def test_self_correction_table():
    recs = [  # first pass right, kept; first pass wrong, fixed; first pass wrong, not fixed; a v1 reply (ignored)
        {"operators": 2, "answer": "145", "correct": True, "output": "So the first pass gives 145.\n..."},
        {"operators": 2, "answer": "145", "correct": True, "output": "So the first pass gives 155.\n..."},
        {"operators": 3, "answer": "7", "correct": False, "output": "So the first pass gives 8.\n..."},
        {"operators": 3, "answer": "7", "correct": True, "output": "Both passes agree, so the answer is 7."},
    ]
    t = self_correction(recs)
    assert t["all"] == {"n": 3, "first_wrong": 2, "fixed": 1, "first_right": 1, "kept": 1, "fixed_fraction": 0.5, "kept_fraction": 1.0}
    assert t["by_operators"]["3"]["fixed_fraction"] == 0.0 and t["by_operators"]["2"]["n"] == 2
    assert "closed_wrong" not in t["all"]
    assert self_correction(recs[3:]) is None
    assert checked.first_pass_value("no first pass here") is None


def test_self_correction_counts_thoughts_a_switch_closed():
    recs = [  # kv-online: closed after a wrong first pass, closed after a right one, run to the end, closed before any first pass
        {"operators": 3, "answer": "7", "correct": False, "route": "slow", "switched_at": 120, "output": "So the first pass gives 8.\n</think>\n\n8"},
        {"operators": 3, "answer": "7", "correct": True, "route": "slow", "switched_at": 120, "output": "So the first pass gives 7.\n</think>\n\n7"},
        {"operators": 2, "answer": "7", "correct": True, "route": "slow", "switched_at": None, "output": "So the first pass gives 9.\n... the answer is 7."},
        {"operators": 2, "answer": "7", "correct": True, "route": "slow", "switched_at": 30, "output": "7 + 0: so 7\n</think>\n\n7"},
        {"operators": 1, "answer": "7", "correct": True, "route": "fast", "switched_at": None, "output": "7"},
    ]
    t = self_correction(recs)
    assert t["all"] == {"n": 3, "first_wrong": 2, "fixed": 1, "first_right": 1, "kept": 1, "closed_wrong": 1, "closed_right": 1,
                        "fixed_fraction": 0.5, "kept_fraction": 1.0, "closed_before_first_pass": 1}
    assert t["by_operators"]["2"]["closed_wrong"] == 0 and t["by_operators"]["3"]["closed_wrong"] == 1
    from serve_app.offline.eval_report import format_self_correction

    text = format_self_correction(t)
    assert "closed after wrong" in text and "closed before a first pass was stated: 1" in text


def test_train_model_options_and_config_file_make_the_v2_config(tmp_path):
    from serve_app.cli import build_parser
    from serve_app.offline.train_cli import train_config

    cfg_file = tmp_path / "c.json"
    cfg_file.write_text('{"steps": 7, "slip_fraction": 0.1, "task": {"max_operand": 500}}')
    args = build_parser().parse_args(["train-model", "--out", "x", "--config", str(cfg_file), "--reply-format", "checked",
                                      "--slip-fraction", "0.25", "--max-operators", "8", "--operands", "mixed", "--max-positions", "2048"])
    cfg = train_config(args)
    assert (cfg.steps, cfg.slip_fraction, cfg.reply_format, cfg.max_positions) == (7, 0.25, "checked", 2048)
    keyed = build_parser().parse_args(["train-model", "--out", "x", "--reply-format", "checked-keyed"])
    assert train_config(keyed).reply_format == "checked-keyed"
    judged = build_parser().parse_args(["train-model", "--out", "x", "--reply-format", "checked-judged", "--check-slip-fraction", "0.4"])
    assert (train_config(judged).reply_format, train_config(judged).check_slip_fraction) == ("checked-judged", 0.4)
    double = build_parser().parse_args(["train-model", "--out", "x", "--reply-format", "checked-judged", "--double-slip-fraction", "0.5"])
    assert train_config(double).double_slip_fraction == 0.5
    close = build_parser().parse_args(["train-model", "--out", "x", "--close-step-fraction", "0.3"])
    assert train_config(close).close_step_fraction == 0.3
    operation = build_parser().parse_args(["train-model", "--out", "x", "--operation-slip-fraction", "0.3"])
    assert train_config(operation).operation_slip_fraction == 0.3
    assert (cfg.task.max_operators, cfg.task.max_operand, cfg.task.operands) == (8, 500, "mixed")
    assert train_config(build_parser().parse_args(["train-model", "--out", "x"])) == TrainConfig()


def test_half_of_the_one_digit_result_slips_change_the_last_digit():
    # stage 4: the verdicts that still called a mismatch "right" were all last-column differences
    rng = random.Random(13)
    p = Problem((43, 27, 93, 19, 24, 11, 21, 3), ("-", "-", "+", "+", "-", "-", "-"))
    values = p.running_values()
    digit = [s for s in (sample_slip(rng, p) for _ in range(4000)) if s.kind == "result" and s.value != -values[s.step]]
    last = [s for s in digit if str(abs(s.value))[:-1] == str(abs(values[s.step]))[:-1]]
    # half forced to the last digit, plus the uniform choice landing there for the other half (1/2 of two-digit values)
    assert 0.65 < len(last) / len(digit) < 0.85


def test_close_steps_put_one_signed_step_with_close_magnitudes_into_slow_training_questions():
    from serve_app.offline.first_pass_errors import crosses_zero
    from serve_app.offline.train import with_close_step

    task = TaskConfig(max_operators=8, max_operand=999, operands="mixed")  # the v2 training questions
    cfg = TrainConfig(reply_format="checked", close_step_fraction=1.0, task=task)
    rng = random.Random(12)
    with_close, crossing = 0, 0
    for _ in range(2000):
        p = sample_training_problem(cfg, rng, thinking=True)
        assert all(0 <= x <= 999 for x in p.operands)
        values = [p.operands[0], *p.running_values()]
        close = [j for j, (op, x) in enumerate(zip(p.ops, p.operands[1:]))
                 if abs(values[j + 1]) <= 9 and abs(abs(values[j]) - x) <= 9 and (op == "+") == (values[j] < 0)]
        with_close += bool(close)
        crossing += any(crosses_zero(p, j) for j in close)
    assert with_close / 2000 > 0.95  # all but those whose running value passed 999 there (the operand is clamped: 77 of 2000)
    assert 0.4 < crossing / 2000 < 0.6  # about half cross zero (where d and the running value differ in sign)
    assert with_close_step(random.Random(0), Problem((5, 3), ("+",)), 99).ops == ("-",)  # after 5: 5 - b, b in 0..14
    off = cfg.model_copy(update={"close_step_fraction": 0.0})
    fast = [sample_training_problem(cfg, random.Random(k), thinking=False) for k in range(50)]
    assert fast == [sample_training_problem(off, random.Random(k), thinking=False) for k in range(50)]  # fast questions untouched
    plain = []
    for k in range(50):
        r = random.Random(k)
        plain.append(sample_problem(r, r.randint(task.min_operators, task.max_operators), 999, "mixed"))
    assert [sample_training_problem(off, random.Random(k), thinking=True) for k in range(50)] == plain  # without it, as before
