"""The shipped embedded model: loads offline with standard classes, is the documented shape, answers."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM

from serve_app.cli import main
from serve_app.core.task import is_correct
from serve_app.offline.generate import build_prompt, generate_greedy


def test_loads_offline_with_auto_classes(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    assert isinstance(model, Qwen3ForCausalLM)
    cfg = model.config
    assert cfg.head_dim == 64
    assert cfg.num_hidden_layers >= 4
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.vocab_size >= len(tokenizer)


def test_shipped_files_fit_the_size_budget(model_dir):
    total = sum(f.stat().st_size for f in Path(model_dir).iterdir() if f.is_file())
    assert total <= 25 * 1024 * 1024
    assert (Path(model_dir) / "model.safetensors").is_file()
    assert (Path(model_dir) / "README.md").is_file()


@pytest.mark.parametrize("thinking", [False, True])
def test_answers_two_plus_three_in_both_modes(shipped, thinking):
    model, tokenizer = shipped
    gen = generate_greedy(model, tokenizer, [build_prompt(tokenizer, "What is 2 + 3?", thinking)], 300)[0]
    assert gen.finished and gen.text.endswith("<|im_end|>")
    assert is_correct(gen.text, 5), gen.text
    if thinking:
        assert "</think>" in gen.text and gen.tokens > 15
    else:
        assert "<think>" not in gen.text and gen.tokens <= 4


def test_batched_generation_matches_one_at_a_time(shipped):
    model, tokenizer = shipped
    questions = ["What is 2 + 3?", "What is 91 - 7 + 45 - 3?", "What is 10 - 99?"]
    prompts = [build_prompt(tokenizer, q, True) for q in questions]
    batched = [g.text for g in generate_greedy(model, tokenizer, prompts, 300)]
    single = [generate_greedy(model, tokenizer, [p], 300)[0].text for p in prompts]
    assert batched == single


def test_eval_cli_writes_report_json_and_plot(model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    assert main(["gen-data", "--out", str(data), "--n", "12", "--seed", "424242"]) == 0
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(model_dir), "--dataset", str(data), "--policy", "fast,slow", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for name in ("fast", "slow"):
        pol = report["policies"][name]
        assert pol["n"] == 12 and 0 <= pol["accuracy"] <= 1 and pol["mean_tokens"] > 0
        assert sum(c["n"] for c in pol["by_operators"].values()) == 12
        assert set(next(iter(pol["by_operators"].values()))) >= {"n", "accuracy", "mean_tokens"}
    assert report["policies"]["slow"]["mean_tokens"] > report["policies"]["fast"]["mean_tokens"]
    assert out.with_suffix(".png").stat().st_size > 0
    assert "operators" in capsys.readouterr().out


def test_eval_rejects_unknown_policy(model_dir, tmp_path):
    from serve_app.offline.evaluate import EvalConfig

    with pytest.raises(ValueError, match="unknown policy"):
        EvalConfig(model=str(model_dir), dataset="x.jsonl", policies=["fastest"])


def test_train_model_command_produces_a_loadable_model(tmp_path):
    out = tmp_path / "m"
    torch.manual_seed(0)
    assert main(["train-model", "--out", str(out), "--steps", "2", "--tokens-per-batch", "512", "--monitor-every", "1000", "--monitor-size", "1"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, enable_thinking=False, tokenize=False
    ).endswith("<think>\n\n</think>\n\n")
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["steps"] == 2 and saved["monitor_size"] == 1
