"""``kvswitch gen-data``: operator-count mixes (--operators), exclusion lists (--exclude), determinism,
clear errors, the unchanged default, and the documented commands reproducing the shipped data/ files."""

import collections
import json
import random
import re
import shlex
from fractions import Fraction
from pathlib import Path

import pytest

from serve_app.cli import main
from serve_app.core.task import (
    OperatorGroup,
    TaskConfig,
    generate_mix,
    generate_problems,
    mix_counts,
    parse_operator_mix,
    sample_problem,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "models" / "arith-qwen3-tiny" / "README.md"]


def _questions(path: Path) -> list[str]:
    return [json.loads(line)["question"] for line in path.read_text().splitlines() if line.strip()]


def _ops(question: str) -> int:
    return len(re.findall(r" [+-] ", question))


def _gen(tmp_path: Path, *args: str, name: str = "out.jsonl") -> Path:
    out = tmp_path / name
    assert main(["gen-data", "--out", str(out), *args]) == 0
    return out


# ------------------------------------------------------------------ the mix is honoured exactly


def test_parse_operator_mix_reads_counts_ranges_and_weights():
    groups = parse_operator_mix("1:0.6, 2:0.2,4-6:1/5")
    assert [(g.min_operators, g.max_operators) for g in groups] == [(1, 1), (2, 2), (4, 6)]
    assert [str(g.weight) for g in groups] == ["3/5", "1/5", "1/5"]
    assert [g.label for g in groups] == ["1", "2", "4-6"]


@pytest.mark.parametrize(
    ("spec", "n", "expected"),
    [
        ("1:0.6,2:0.2,4:0.2", 10, [6, 2, 2]),
        ("1:0.35,2:0.35,3-6:0.30", 600, [210, 210, 180]),  # exact decimals: no float drift (0.35 * 600)
        ("1:210,2:210,3-6:180", 600, [210, 210, 180]),  # counts that add up to n are taken as they are
        ("1:1,2:1,3:1", 7, [3, 2, 2]),  # largest remainder, ties to the earlier group
        ("1:1,2:1,3:1", 2, [1, 1, 0]),
        ("5:3", 4, [4]),
    ],
)
def test_mix_counts_add_up_to_n(spec, n, expected):
    assert mix_counts(n, parse_operator_mix(spec)) == expected


def test_mix_counts_always_add_up_and_stay_within_one_of_the_quota():
    rng = random.Random(0)
    for _ in range(300):
        weights = [rng.randint(1, 50) for _ in range(rng.randint(1, 6))]
        groups = [OperatorGroup(i + 1, i + 1, w) for i, w in enumerate(map(Fraction, weights))]
        n = rng.randint(1, 1000)
        counts = mix_counts(n, groups)
        assert sum(counts) == n
        assert all(abs(c - n * w / sum(weights)) < 1 for c, w in zip(counts, weights))


def test_cli_mix_gives_exact_operator_counts_in_group_order(tmp_path):
    out = _gen(tmp_path, "--n", "50", "--seed", "3", "--operators", "1:0.6,2:0.2,4:0.2")
    ops = [_ops(q) for q in _questions(out)]
    assert collections.Counter(ops) == {1: 30, 2: 10, 4: 10}
    assert ops == [1] * 30 + [2] * 10 + [4] * 10  # groups one after the other, in the order given


def test_a_range_group_stays_inside_its_range_and_is_drawn_uniformly_there(tmp_path):
    out = _gen(tmp_path, "--n", "400", "--seed", "9", "--operators", "2:1,3-6:3")
    counts = collections.Counter(_ops(q) for q in _questions(out))
    assert counts[2] == 100
    assert set(counts) == {2, 3, 4, 5, 6}
    assert sum(counts[k] for k in range(3, 7)) == 300


def test_group_i_is_the_plain_generator_with_seed_times_ten_plus_i():
    groups = parse_operator_mix("1:2,3-4:1")
    got = generate_mix(30, 77, groups)
    assert got[:20] == generate_problems(20, 771, TaskConfig(min_operators=1, max_operators=1))
    assert got[20:] == generate_problems(10, 772, TaskConfig(min_operators=3, max_operators=4))


# ------------------------------------------------------------------ exclusion


def test_excluded_questions_are_absent_and_the_count_is_kept(tmp_path):
    # 1 operator, operands 0-3: only 32 distinct questions, so exclusion is hit on almost every draw
    small = TaskConfig(min_operators=1, max_operators=1, max_operand=3)
    banned = {p.question for p in generate_problems(40, 5, small)}
    assert 10 < len(banned) < 32
    kept = generate_problems(50, 6, small, exclude=banned)
    assert len(kept) == 50
    assert not banned & {p.question for p in kept}
    dropped = generate_problems(50, 6, small, exclude=banned, drop_excluded=True)
    assert len(dropped) < 50
    assert not banned & {p.question for p in dropped}
    # dropping keeps the surviving draws in place: it is the plain list with the excluded ones filtered out
    assert dropped == [p for p in generate_problems(50, 6, small) if p.question not in banned]


def test_cli_exclude_keeps_a_new_set_disjoint_from_several_files(tmp_path):
    a = _gen(tmp_path, "--n", "300", "--seed", "1", "--operators", "1:1", name="a.jsonl")
    b = _gen(tmp_path, "--n", "300", "--seed", "2", "--operators", "1:1", name="b.jsonl")
    plain = _gen(tmp_path, "--n", "300", "--seed", "11", "--min-operators", "1", "--max-operators", "1", name="plain.jsonl")
    # without --exclude the draw overlaps the others (about 300·600/20402 ≈ 9 shared questions expected)
    banned = set(_questions(a)) | set(_questions(b))
    assert banned & set(_questions(plain))
    out = _gen(tmp_path, "--n", "300", "--seed", "11", "--min-operators", "1", "--max-operators", "1",
               "--exclude", str(a), str(b), name="c.jsonl")
    got = _questions(out)
    assert len(got) == 300
    assert not banned & set(got)
    # and each question not excluded is where the plain draw had it, in order
    plain_kept = [q for q in _questions(plain) if q not in banned]
    assert got[: len(plain_kept)] == plain_kept


def test_exclude_with_a_mix_keeps_the_mix_exact(tmp_path):
    a = _gen(tmp_path, "--n", "200", "--seed", "4", "--operators", "1:1", name="a.jsonl")
    out = _gen(tmp_path, "--n", "200", "--seed", "5", "--operators", "1:0.5,2:0.5", "--exclude", str(a))
    got = _questions(out)
    assert collections.Counter(_ops(q) for q in got) == {1: 100, 2: 100}
    assert not set(_questions(a)) & set(got)


def test_exclusion_that_leaves_too_few_questions_fails_instead_of_looping():
    small = TaskConfig(min_operators=1, max_operators=1, max_operand=1)  # 8 distinct questions
    every = {p.question for p in generate_problems(500, 0, small)}
    assert len(every) == 8
    with pytest.raises(ValueError, match="excluded"):
        generate_problems(3, 1, small, exclude=every)


# ------------------------------------------------------------------ determinism and the unchanged default


def test_same_seed_same_bytes_other_seed_other_questions(tmp_path):
    args = ("--n", "120", "--operators", "1:0.25,2-3:0.25,6:0.5")
    one = _gen(tmp_path, *args, "--seed", "42", name="one.jsonl").read_bytes()
    two = _gen(tmp_path, *args, "--seed", "42", name="two.jsonl").read_bytes()
    other = _gen(tmp_path, *args, "--seed", "43", name="other.jsonl").read_bytes()
    assert one == two
    assert one != other


def _old_generator(n: int, seed: int, lo: int = 1, hi: int = 6) -> list[str]:
    """gen-data as it was before --operators/--exclude (one RNG: operator count, then the problem)."""
    rng = random.Random(seed)
    return [sample_problem(rng, rng.randint(lo, hi), 99).question for _ in range(n)]


@pytest.mark.parametrize(("seed", "extra", "lo", "hi"), [(424242, (), 1, 6), (8080, ("--min-operators", "4", "--max-operators", "6"), 4, 6),
                                                          (5, ("--max-operators", "2"), 1, 2)])
def test_without_the_new_options_the_output_is_what_it_was(tmp_path, seed, extra, lo, hi):
    out = _gen(tmp_path, "--n", "200", "--seed", str(seed), *extra)
    assert _questions(out) == _old_generator(200, seed, lo, hi)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--operators", "1:x"], "bad weight 'x'"),
        (["--operators", "1=0.5"], "expected K:W"),
        (["--operators", "a:0.5"], "expected K:W"),
        (["--operators", "0:1"], "need 1 <= min <= max"),
        (["--operators", "4-2:1"], "need 1 <= min <= max"),
        (["--operators", "1:-0.5"], "weights must be > 0"),
        (["--operators", "1:0.5,,2:0.5"], "empty part"),
        (["--operators", "1-3:0.5,2:0.5"], "overlap"),
        (["--operators", "1:1", "--min-operators", "2"], "drop --min-operators/--max-operators"),
        (["--exclude", "/no/such/file.jsonl"], "no such file: /no/such/file.jsonl"),
        (["--exclude", "README.md"], "README.md is not a JSONL dataset"),
        (["--drop-excluded"], "--drop-excluded needs --exclude"),
        (["--min-operators", "5", "--max-operators", "2"], "--min-operators 5 is above --max-operators 2"),
        (["--n", "0"], "must be >= 1"),
    ],
)
def test_bad_input_is_an_argparse_error_that_names_the_problem(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(ROOT)  # README.md is a relative path above
    with pytest.raises(SystemExit) as exc:
        main(["gen-data", "--out", str(tmp_path / "x.jsonl"), "--seed", "1", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "kvswitch gen-data: error:" in err
    assert message in err
    assert not (tmp_path / "x.jsonl").exists()


# ------------------------------------------------------------------ the documented commands reproduce data/


def _documented_gen_data_commands() -> list[list[str]]:
    commands = []
    for doc in DOCS:
        text = doc.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            line = line.strip()
            if line.startswith(".venv/bin/kvswitch gen-data "):
                commands.append(shlex.split(line.split("#", 1)[0])[1:])
    return commands


def test_every_shipped_data_file_has_a_documented_command_that_reproduces_it_byte_for_byte(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the commands name data/ files relative to the repository root
    reproduced = set()
    for i, argv in enumerate(_documented_gen_data_commands()):
        out = argv[argv.index("--out") + 1]
        if not out.startswith("data/"):
            continue
        argv = list(argv)
        argv[argv.index("--out") + 1] = str(tmp_path / f"{i}.jsonl")
        assert main(argv) == 0
        assert (tmp_path / f"{i}.jsonl").read_bytes() == (ROOT / out).read_bytes(), f"{shlex.join(argv)} does not reproduce {out}"
        reproduced.add(out)
    shipped = {f"data/{p.name}" for p in (ROOT / "data").glob("*.jsonl")}
    assert shipped <= reproduced, f"no documented gen-data command for {sorted(shipped - reproduced)}"


def test_styles_write_the_same_questions_and_answers_in_each_format(tmp_path):
    from serve_app.core.datasets import read_dataset

    rows = {}
    for style in ("native", "gsm8k", "math"):
        out = tmp_path / f"{style}.jsonl"
        assert main(["gen-data", "--out", str(out), "--n", "30", "--seed", "5", "--style", style]) == 0
        rows[style] = read_dataset(out)
    assert "solution" in json.loads((tmp_path / "math.jsonl").read_text().splitlines()[0])
    assert "\n#### " in json.loads((tmp_path / "gsm8k.jsonl").read_text().splitlines()[0])["answer"]
    pairs = {style: [(r["question"], r["answer"]) for r in got] for style, got in rows.items()}
    assert pairs["native"] == pairs["gsm8k"] == pairs["math"] and len(pairs["native"]) == 30


@pytest.mark.parametrize("operands,max_operand,lengths", [("digits", 999, {1: 1 / 3, 2: 1 / 3, 3: 1 / 3}),
                                                          ("mixed", 999, {1: 0.3 + 0.5 * 0.1, 2: 0.5 * 0.9, 3: 0.2})])
def test_operand_lengths_follow_the_chosen_mix(tmp_path, operands, max_operand, lengths):
    out = tmp_path / "ops.jsonl"
    assert main(["gen-data", "--out", str(out), "--n", "1500", "--seed", "3", "--min-operators", "7", "--max-operators", "8",
                 "--operands", operands, "--max-operand", str(max_operand)]) in (0, None)
    values = [int(v) for line in out.read_text().splitlines() for v in re.findall(r"\d+", json.loads(line)["question"])]
    assert max(values) <= max_operand and max(values) >= 100
    counts = collections.Counter(len(str(v)) for v in values)
    for k, share in lengths.items():
        assert abs(counts[k] / len(values) - share) < 0.02, (k, counts[k] / len(values), share)
