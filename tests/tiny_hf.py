"""A tiny random GPT-2 (2 layers, 32 wide, n_positions 48) with a 300-token byte-level BPE trained
on the embedded corpus, saved by transformers twice: `plain` without a chat template and
`chat_name` with `template`. For the tests of chat templates (serve, instruction data)."""

from pathlib import Path

import torch
import transformers

from crystal.data import EOT, default_corpus


def save_tiny_gpt2(root: Path, template: str, chat_name: str = "chat") -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([default_corpus()[:30_000].decode()], trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOT], show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOT, bos_token=EOT)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tok), n_positions=48, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(root / "plain")
    tok.save_pretrained(root / "plain")
    tok.chat_template = template
    model.save_pretrained(root / chat_name)
    tok.save_pretrained(root / chat_name)
