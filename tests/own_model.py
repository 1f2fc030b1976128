"""A second local model for the tests: a tiny Qwen3-architecture checkpoint with its own BPE
tokenizer (trained here with the ``tokenizers`` library) and a DeepSeek-R1-distill style chat
template, which has no thinking switch (every assistant turn opens ``<think>\\n``). Built at test
time, never downloaded; its weights are random, so its answers are too (the tests check mechanics)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from serve_app.core.task import generate_problems

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
R1_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}{{ '" + USER + "' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- set content = message['content'] -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
    "{{ '" + ASSISTANT + "' + content + '" + EOS + "' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '" + ASSISTANT + "<think>\\n' }}{%- endif -%}"
)
"""R1-distill's template shape: no ``enable_thinking``; the generation prompt always opens a thought."""


def _corpus(n: int = 400) -> list[str]:
    lines = []
    for p in generate_problems(n, seed=7):
        lines.append(f"{p.question}\n<think>\nLet me add. {p.question} gives {p.answer}.\n</think>\n\nThe answer is {p.answer}.")
    return lines


def build_r1_checkpoint(out: str | Path, vocab_size: int = 400, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Write the checkpoint to ``out`` (config, ``dtype`` weights, tokenizer with the R1 template)."""
    out = Path(out)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, USER, ASSISTANT, "<think>", "</think>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, chat_template=R1_TEMPLATE)
    fast.save_pretrained(out)
    config = Qwen3Config(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(dtype)
    model.save_pretrained(out)
    return out


if __name__ == "__main__":  # python tests/own_model.py DIR
    import sys

    print(build_r1_checkpoint(sys.argv[1]))
