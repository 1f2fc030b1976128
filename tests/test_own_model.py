"""Bring your own model: mode prompts from any hybrid-thinking chat template, and a second local
checkpoint (tests/own_model.py: tiny Qwen3 architecture, its own BPE tokenizer, an R1-distill style
template without a thinking switch, bfloat16 weights) through calibrate and eval. The service half
(serve, chat, stream, embeddings) is in tests/test_service.py, on that module's Ray instance."""

import json

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from serve_app.cli import main
from serve_app.core.prompts import FAST_PREFIX, ModePrompts, ThinkTags, base_prompt, resolve_prompts
from serve_app.engines.base import TokenSetup, checkpoint_dtype
from serve_app.engines.hf import HFEngine
from serve_app.engines.load import load_model
from tests.own_model import ASSISTANT, build_r1_checkpoint

DATA = "data/test-600-seed20261124.jsonl"
TURN = [{"role": "user", "content": "What is 2 + 3?"}]

# Qwen3's own template, reduced to its generation prompt: thinking on adds nothing, off adds an empty thought
QWEN3 = ("{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor -%}"
         "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
         "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}{%- endif -%}")


def _tokenizer(shipped_tokenizer, template: str) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=shipped_tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def r1(tmp_path_factory):
    return build_r1_checkpoint(tmp_path_factory.mktemp("r1") / "ckpt")


def test_the_embedded_template_gives_the_default_prompts(shipped):
    assert resolve_prompts(shipped[1]) == ModePrompts()


def test_a_qwen3_switch_template_takes_its_thinking_off_turn_as_the_fast_prefix(shipped):
    tok = _tokenizer(shipped[1], QWEN3)
    p = resolve_prompts(tok)
    assert (p.fast_prefix, p.slow_prefix, p.always_thinks) == (FAST_PREFIX, "<think>\n", False)
    assert base_prompt(tok, TURN, p).endswith("<|im_start|>assistant\n")


def test_an_r1_template_has_no_switch_so_fast_is_a_prefilled_empty_thought(r1):
    tok = AutoTokenizer.from_pretrained(r1, local_files_only=True)
    p = resolve_prompts(tok)
    assert p.always_thinks and p.fast_prefix == FAST_PREFIX
    assert base_prompt(tok, TURN, p).endswith(ASSISTANT)  # the template's own "<think>\n" is the slow prefix, not the shared prompt
    assert TokenSetup(tok).prefix_ids["slow"] == tok.encode("<think>\n", add_special_tokens=False)


def test_other_think_tags_are_followed(shipped):
    template = QWEN3.replace("<think>", "<reason>").replace("</think>", "</reason>")
    p = resolve_prompts(_tokenizer(shipped[1], template), ThinkTags(open="<reason>", close="</reason>"))
    assert (p.fast_prefix, p.slow_prefix, p.close_think) == ("<reason>\n\n</reason>\n\n", "<reason>\n", "</reason>\n\n")


@pytest.mark.parametrize("template, why", [
    (None, "no chat template"),
    (QWEN3.replace("{%- if enable_thinking is defined and enable_thinking is false -%}", "{%- if true -%}"), "thinking cannot be turned on"),
    (QWEN3.replace("<think>\\n\\n</think>", "<think>\\nno</think>"), "thinking-off turn is not its thinking-on turn plus an empty thought"),
])
def test_a_template_that_cannot_give_both_modes_is_refused_with_the_reason(shipped, template, why):
    tok = _tokenizer(shipped[1], template or "")
    tok.chat_template = template
    with pytest.raises(ValueError, match=why):
        resolve_prompts(tok)


def test_think_tags_the_model_does_not_know_are_refused(shipped):
    with pytest.raises(ValueError, match="neither the chat template nor the vocabulary knows the think tags '<reason>'"):
        resolve_prompts(shipped[1], ThinkTags(open="<reason>", close="</reason>"))


def test_dtype_auto_is_the_checkpoints_own(r1, model_dir):
    model, _ = load_model(r1)
    assert model.dtype == torch.bfloat16 and checkpoint_dtype(model.config) == "bfloat16"
    assert load_model(r1, "float32")[0].dtype == torch.float32
    assert checkpoint_dtype(load_model(model_dir)[0].config) == "float32"


def test_the_r1_checkpoint_generates_in_both_modes_from_one_prefill(r1):
    engine = HFEngine(*load_model(r1))
    from serve_app.engines.base import GenRequest

    fast, slow = engine.generate([GenRequest(engine.encode_prompt(TURN), mode=m, max_new_tokens=6) for m in ("fast", "slow")])
    assert fast.reply.startswith(FAST_PREFIX) and slow.reply.startswith("<think>\n") and fast.tokens == slow.tokens == 6


def test_the_r1_checkpoint_calibrates_and_evaluates(r1, tmp_path):
    probe, cal = r1 / "probe.pt", tmp_path / "cal.json"
    assert main(["calibrate", "--model", str(r1), "--dataset", DATA, "--limit", "20", "--max-new-tokens", "16", "--features", "kv,random",
                 "--out", str(probe), "--report", str(cal)]) in (0, None)
    report = json.loads(cal.read_text())
    assert report["n_questions"] == 20 and report["dtype"] == "bfloat16"
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(r1), "--dataset", DATA, "--limit", "8", "--policy", "fast,slow,kv-oneshot,kv-online",
                 "--max-new-tokens", "16", "--out", str(out)]) in (0, None)
    ev = json.loads(out.read_text())
    assert set(ev["policies"]) == {"fast", "slow", "kv-oneshot", "kv-online"}
    assert all(p["n"] == 8 and 0 < p["mean_tokens"] <= 16 for p in ev["policies"].values())
