"""The token-weights stage's networks (KPOD §4.1), each built from its config node (`TokenWeighter(cfg, embedding)`):
the weighting module over the student's input embeddings and the answer predictor that reads the masked rationale
as embeddings. tasks/token_weights.py trains them (imported there lazily, as torch is)."""
from __future__ import annotations

import math

import torch
from torch import nn

from keystep.config import TokenWeightsConfig
from tasks.formats import IGNORE
from tasks.packing import pad_stack


class TokenWeighter(nn.Module):
    """KPOD §4.1 eq. 1-2: e = Att(Emb(r)) over the student's frozen input embeddings, w = sigmoid(MLP(e)); `forward`
    returns the token embeddings and the logits of w."""

    def __init__(self, cfg: TokenWeightsConfig, embedding: nn.Embedding):
        super().__init__()
        self.cfg = cfg
        dim = embedding.embedding_dim
        self.emb = nn.Embedding.from_pretrained(embedding.weight.detach().clone(), freeze=True)
        self.att = nn.MultiheadAttention(dim, cfg.attention_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, cfg.mlp_hidden), nn.GELU(), nn.Linear(cfg.mlp_hidden, 1))
        nn.init.constant_(self.mlp[2].bias, math.log(cfg.init_keep / (1 - cfg.init_keep)))  # masks start open
        self.e_mask = nn.Parameter(torch.zeros(dim))
        self.register_buffer("scale", embedding.weight.detach().norm(dim=-1).mean(), persistent=False)

    def _positions(self, rationale):
        """Sinusoidal positions counted from each rationale's first token, at the embeddings' mean norm."""
        pos = (rationale.cumsum(-1) - 1).clamp(min=0).float().unsqueeze(-1)
        dim = self.e_mask.shape[0]
        freq = torch.exp(torch.arange(0, dim, 2, device=pos.device).float() * (-math.log(10000.0) / dim))
        out = torch.zeros((*rationale.shape, dim), device=pos.device)
        out[..., 0::2], out[..., 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)[..., : dim // 2]
        return out * self.scale / math.sqrt(dim / 2)

    def forward(self, ids, pad, rationale):
        """`pad`: real tokens; `rationale`: the rationale's tokens. With weighter_input 'rationale' the attention
        reads only those (eq. 1: e = Att(Emb(r))); every other position's logit goes unused."""
        x = self.emb(ids)
        keys = rationale if self.cfg.weighter_input == "rationale" else pad
        q = x + self._positions(rationale) if self.cfg.positions == "sinusoidal" else x
        a, _ = self.att(q, q, x, key_padding_mask=~keys, need_weights=False)
        e = self.norm(x + a)                  # e = Att(Emb(r)), with the layer's residual
        return x, self.mlp(e).squeeze(-1)     # token embeddings, logits of w


class AnswerPredictor(nn.Module):
    """Predicts the answer sentence from [question; masked rationale prefix] given as embeddings (§4.1 eq. 3-5).
    `predictor_dir`: the warmed-up student for `predictor: student`. It reads the prefix, then the answer template's
    lead-in ("Therefore, the answer is"), and is scored on the answer that follows."""

    def __init__(self, cfg: TokenWeightsConfig, embedding: nn.Embedding, tokenizer, predictor_dir: str | None = None,
                 answer_template: str = "Therefore, the answer is {answer}."):
        super().__init__()
        self.lead_in, _, self.tail = answer_template.partition("{answer}")
        dim = embedding.embedding_dim
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

        if cfg.predictor == "student":
            self.lm = AutoModelForCausalLM.from_pretrained(predictor_dir)
            self.tok, self.kind = tokenizer, "causal"
        elif cfg.predictor == "scratch":
            heads = max(1, cfg.predictor_hidden // 32)
            self.lm = LlamaForCausalLM(LlamaConfig(
                vocab_size=len(tokenizer), hidden_size=cfg.predictor_hidden, intermediate_size=4 * cfg.predictor_hidden,
                num_hidden_layers=cfg.predictor_layers, num_attention_heads=heads, num_key_value_heads=heads,
                max_position_embeddings=2048, tie_word_embeddings=True))
            if cfg.predictor_hidden == dim:
                # read and write in the student's embedding space: predicting a token that appears in the
                # rationale is then a copy, not a per-token mapping learned from scratch
                self.lm.get_input_embeddings().weight.data.copy_(embedding.weight.detach())
            self.tok, self.kind = tokenizer, "causal"
        else:
            loader = AutoModelForSeq2SeqLM if cfg.predictor_kind == "seq2seq" else AutoModelForCausalLM
            self.lm = loader.from_pretrained(cfg.predictor)
            self.tok, self.kind = AutoTokenizer.from_pretrained(cfg.predictor), cfg.predictor_kind
        width = self.lm.get_input_embeddings().embedding_dim
        self.proj = nn.Linear(dim, width) if width != dim else nn.Identity()  # embedding sizes may differ

    def answer_nll(self, prefixes: list, answers: list):
        """−log P(y | prefix) per prefix, summed over the answer's tokens (§4.1 eq. 5). An answer is a string
        (read after the answer template's lead-in) or token ids that continue the prefix (a step's result)."""
        dev = prefixes[0].device
        emb = self.lm.get_input_embeddings()
        if self.kind == "seq2seq":
            enc, mask = pad_stack([self.proj(p) for p in prefixes])
            labels = self.tok(answers, return_tensors="pt", padding=True).input_ids.to(dev)
            labels[labels == self.tok.pad_token_id] = IGNORE
            logits = self.lm(inputs_embeds=enc, attention_mask=mask.long(), labels=labels).logits
            return _summed_nll(logits, labels)
        rows, labels = [], []
        lead = torch.tensor(self.tok(" " + self.lead_in.strip(), add_special_tokens=False).input_ids if self.lead_in.strip() else [],
                            dtype=torch.long, device=dev)
        for p, ans in zip(prefixes, answers):
            if isinstance(ans, str):   # the answer sentence after the template's lead-in
                before = lead
                ans_ids = torch.tensor(self.tok(" " + ans + self.tail, add_special_tokens=False).input_ids + [self.tok.eos_token_id], device=dev)
            else:                      # token ids that continue the prefix itself (a step's result)
                before, ans_ids = lead[:0], torch.tensor(ans, dtype=torch.long, device=dev)
            rows.append(torch.cat([self.proj(p), emb(before), emb(ans_ids)]))
            labels.append(torch.cat([torch.full((len(p) + len(before),), IGNORE, device=dev), ans_ids]))
        seq, mask = pad_stack(rows)
        lab, _ = pad_stack(labels, IGNORE)
        logits = self.lm(inputs_embeds=seq, attention_mask=mask.long()).logits
        return _summed_nll(logits[:, :-1], lab[:, 1:])


def _summed_nll(logits, labels):
    """Per row: Σ −log P(label) over the positions that are not IGNORE."""
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    return nll.sum(dim=1)
