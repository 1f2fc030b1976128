"""The v2 candidate (``models/arith-qwen3-tiny-v2``, issue 20) as its card describes it: loads offline
with the standard transformers classes, stays inside the issue's architecture and size limits, and its
probe is bound to it, with the pooling and the dev-chosen thresholds the card names."""

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from serve_app.core.probe import Probe, model_fingerprint
from serve_app.engines.base import GenRequest
from serve_app.engines.hf import HFEngine
from serve_app.offline.thresholds_cli import dev_thresholds

V2 = Path(__file__).resolve().parents[1] / "models" / "arith-qwen3-tiny-v2"


@pytest.fixture(scope="module")
def v2():
    model = AutoModelForCausalLM.from_pretrained(V2, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(V2, local_files_only=True)
    return model.eval(), tokenizer


def test_architecture_and_size_are_within_issue_20s_limits():
    cfg = AutoConfig.from_pretrained(V2, local_files_only=True)
    assert cfg.model_type == "qwen3" and cfg.head_dim == 64 and cfg.num_hidden_layers >= 4
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.max_position_embeddings >= 2048  # 8 operators with the check
    assert (V2 / "model.safetensors").stat().st_size <= 25 * 1024 * 1024


def test_probe_is_bound_to_v2_with_the_cards_pooling_and_dev_chosen_thresholds(v2):
    probe = Probe.load(V2 / "probe.pt", v2[0].config)
    assert probe.data["model_fingerprint"] == model_fingerprint(v2[0].config)
    assert (probe.pooling.part, probe.pooling.last_tokens, probe.decode_pooling.part, probe.decode_pooling.last_tokens) == ("k", 64, "kv", 32)
    source = probe.data["thresholds_source"]
    root = V2.parents[1]
    chosen = dev_thresholds([root / p for p in source["from"]])  # the dev sweeps it names give its τ and δ
    assert {k: probe.thresholds[k] for k in chosen} == chosen == source["set"]


def test_fast_mode_answers_small_questions_and_the_probe_ranks_them_easy(v2):
    model, tokenizer = v2
    engine = HFEngine(model, tokenizer)
    probe = Probe.load(V2 / "probe.pt", model.config)
    easy = ["What is 4 + 5?", "What is 7 - 3?", "What is 12 + 41?"]
    hard = ["What is 14 + 55 - 36 + 17 - 80?", "What is 70 - 33 + 19 - 41 + 26 - 8?", "What is 12 + 92 - 40 + 88 - 91 + 15 - 3?"]
    prompts = [engine.encode_prompt(q) for q in easy + hard]
    d = probe.prompt_difficulty(engine.prompt_features(prompts, probe.pooling)["kv"]).tolist()
    assert max(d[:3]) < min(d[3:]), d
    with torch.no_grad():
        replies = engine.generate([GenRequest(prompt_ids=p, mode="fast", max_new_tokens=8) for p in prompts[:3]])
    assert [r.text.removesuffix("<|im_end|>").strip() for r in replies] == ["9", "4", "53"]
