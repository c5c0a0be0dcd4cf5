"""Build the real-vLLM tier's tiny model: a random Llama and a locally trained tokenizer.

No model can be downloaded here, so the real tier serves this one. Its weights are
random (text is nonsense), which is fine: the conformance suite checks routes, shapes,
framing and determinism, never the words. Sizes follow VLLM_API.md: hidden 128 with 4
heads gives head_dim 32, which vLLM's CPU attention accepts. Run with the tier's venv:

    $VENV/bin/python tests/realvllm/build_model.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


WORDS_TEXT = (
    "the a an of to in is it that for on with as was at by be this from or have not "
    "are but what all were when we there can your which their said if do will each "
    "about how up out them then she many some so these would other into has more her "
    "two like him see time could no make than first been its who now people my made "
    "over did down only way find use may water long little very after words called "
    "just where most know get through back much go good new write our me man too any "
    "day same right look think also around another came come work three word must "
    "hello world model sleep wake token stream server engine memory llama vllm say"
)


def corpus() -> list[str]:
    """A small deterministic English-ish corpus: enough for a few hundred BPE merges."""
    words = WORDS_TEXT.split()
    lines = []
    for i in range(2000):
        lines.append(" ".join(words[(i * 7 + j * 13) % len(words)] for j in range(12)))
    lines += [f"{n} {n + 1} {n * 2}." for n in range(200)]
    lines.append("Hello! How are you? I'm fine, thanks. Yes/no: (a) [b] {c} <d> #e $f %g & * + = -")
    return lines


def main(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIALS[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 512
    fast.save_pretrained(out)

    torch.manual_seed(1234)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    # vLLM reads the chat template from tokenizer_config.json; keep a copy on disk too.
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    print(f"built tiny model in {out} (vocab {len(fast)})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: build_model.py OUT_DIR")
    main(Path(sys.argv[1]))
