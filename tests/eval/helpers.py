"""Models whose outputs the tests control: a byte-level tokenizer, a bigram network (logits at
position t depend only on token t, so every log-probability has a closed form), a CausalLM that
answers from a script, and a tiny randomly initialised Hugging Face model saved locally."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lmrun.eval.models import CausalLM
from lmrun.inference.engine import Completion

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
EOS = 256


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, ``<|endoftext|>`` = 256."""

    special_ids = {"<|endoftext|>": EOS}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BigramModel(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: shape (batch, seq, 257)."""

    def __init__(self, table: torch.Tensor, context_length: int = 512):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())
        self.vocab_size, self.context_length = table.shape[1], context_length
        # one layer whose token mixer has no KV cache: InferenceEngine recomputes every step
        self.layers = torch.nn.ModuleList([torch.nn.Module()])
        self.layers[0].attn = torch.nn.Identity()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids]


def bigram_lm(table: torch.Tensor | None = None, context_length: int = 512, seed: int = 0) -> CausalLM:
    if table is None:
        table = torch.randn(257, 257, generator=torch.Generator().manual_seed(seed))
    return CausalLM(model=BigramModel(table, context_length), tokenizer=ByteTokenizer(), eos_token_id=EOS,
                    context_length=context_length, source="bigram")


class ScriptedLM(CausalLM):
    """``generate`` answers each prompt with ``script(prompt text)``; the prompts it received are
    kept in ``seen`` (decoded text)."""

    def __init__(self, script, context_length: int = 4096, table: torch.Tensor | None = None):
        base = bigram_lm(table, context_length)
        super().__init__(model=base.model, tokenizer=base.tokenizer, eos_token_id=EOS, context_length=context_length,
                         source="scripted")
        self.script, self.seen, self.params = script, [], []

    def generate(self, prompts, params) -> list[Completion]:
        out = []
        for p in prompts:
            text = self.decode(p) if not isinstance(p, str) else p
            self.seen.append(text)
            self.params.append(params)
            reply = self.script(text)
            ids = self.encode(reply)
            out.append(Completion(prompt_ids=self.encode(text), token_ids=ids, logprobs=[-1.0] * len(ids),
                                  text=reply, finish_reason="stop"))
        return out


def save_tiny_hf_model(path: Path, arch: str = "gpt2", context_length: int = 256, seed: int = 0) -> Path:
    """A randomly initialised 1-layer GPT-2 or Llama and a byte-level BPE tokenizer (trained here on
    a Shakespeare fixture, exported with ``Tokenizer.to_hf``) saved to ``path``; nothing is
    downloaded."""
    import transformers

    from lmrun.tokenizer.bpe import train_bpe
    from lmrun.tokenizer.tokenizer import Tokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = train_bpe(FIXTURES / "enc_tinyshakespeare_head.txt", 320, ["<|endoftext|>"], num_workers=1)
    tok = Tokenizer(vocab, merges, ["<|endoftext|>"])
    tok.to_hf(path / "tokenizer.json")
    eos = tok.special_ids["<|endoftext|>"]
    if arch == "llama":  # Llama-style: the tokenizer puts a BOS token (here <|endoftext|>) in front of every text
        doc = json.loads((path / "tokenizer.json").read_text())
        bos = {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
        doc["post_processor"] = {
            "type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [eos], "tokens": ["<|endoftext|>"]}}}
        (path / "tokenizer.json").write_text(json.dumps(doc))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(vocab), n_positions=context_length,
                                      bos_token_id=eos, eos_token_id=eos)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                       num_key_value_heads=1, vocab_size=len(vocab),
                                       max_position_embeddings=context_length, bos_token_id=eos, eos_token_id=eos)
        model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return path
