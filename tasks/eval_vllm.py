"""Evaluation decoding through vLLM: vllm.LLM in this process when vLLM imports here (a GPU environment), else a
vLLM OpenAI server keystep starts from `eval.vllm_python` (the separate vLLM environment, as for the teacher).

Input: a student folder — a plain HF model folder (a full or merged LoRA checkpoint), or a peft adapter folder,
served as its base + the adapter (`--enable-lora`) — the evaluation prompts as token ids (exactly the ids HF
generate gets, from tasks/formats.generation_prompt) and a token budget per prompt. Output: the greedy
continuations' texts in prompt order, which tasks/evaluate.py scores into the same predictions table.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

from keystep.config import EvalConfig
from tasks.student import adapter_config, weights_folder
from tasks.teacher_backends import vllm_importable, vllm_server

SERVED_NAME = "student"


def engine(cfg: EvalConfig) -> str:
    """'hf', 'vllm' (in process) or 'vllm-server' for `eval.backend`."""
    if cfg.backend == "hf":
        return "hf"
    if vllm_importable():
        return "vllm"
    if cfg.vllm_python:
        return "vllm-server"
    if cfg.backend == "vllm":
        raise ValueError("config key 'eval.vllm_python': eval.backend 'vllm' needs vLLM importable here or the Python "
                         "of a vLLM environment (e.g. .venv-vllm/bin/python from `make test-vllm`); or set eval.backend: hf")
    return "hf"


def generate_in_process(path: str, prompt_ids: list[list[int]], budgets: list[int], max_model_len: int) -> list[str]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    adapter = adapter_config(path)
    llm = LLM(model=weights_folder(path), tokenizer=path, seed=0,
              max_model_len=max_model_len, enable_lora=bool(adapter),
              **({"max_lora_rank": adapter["r"]} if adapter else {}))
    params = [SamplingParams(temperature=0.0, max_tokens=b) for b in budgets]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params,
                           lora_request=LoRARequest(SERVED_NAME, 1, path) if adapter else None)
    del llm
    return [o.outputs[0].text for o in outputs]


def generate_with_server(path: str, prompt_ids: list[list[int]], budgets: list[int], max_model_len: int,
                         cfg: EvalConfig, log_path: Path) -> list[str]:
    adapter = adapter_config(path)
    args = ["--max-model-len", str(max_model_len), "--tokenizer", str(path), *cfg.vllm_args]
    if adapter:
        args += ["--enable-lora", "--max-lora-rank", str(adapter["r"]), "--lora-modules", f"{SERVED_NAME}={path}"]
    with vllm_server(cfg.vllm_python, weights_folder(path), log_path, "base" if adapter else SERVED_NAME, 0, args,
                     cfg.server_start_timeout_s, "eval.vllm_python") as url:
        return asyncio.run(_complete_all(url, prompt_ids, budgets, cfg.concurrency))


async def _complete_all(url: str, prompt_ids: list[list[int]], budgets: list[int], concurrency: int) -> list[str]:
    """Greedy completions of token-id prompts, `concurrency` in flight (the server batches them); transport
    faults are retried by the client."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=5, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def one(ids: list[int], budget: int) -> str:
        async with gate:
            out = await client.completions.create(model=SERVED_NAME, prompt=ids, max_tokens=budget, temperature=0.0)
        if not out.choices:
            raise RuntimeError("vLLM returned no choices for an evaluation prompt")
        return out.choices[0].text

    try:
        return list(await asyncio.gather(*(one(ids, b) for ids, b in zip(prompt_ids, budgets))))
    finally:
        await client.close()


def vllm_requests(path: str, tokenizer, prompts: list[str], max_new_tokens: int) -> tuple[list[list[int]], list[int], int]:
    """(prompt token ids, token budget per prompt, the model's context length): the evaluation prompts as HF
    generate sees them, each budget cut so a prompt never decodes past the context (as HF generate is limited)."""
    from transformers import AutoConfig

    from tasks.formats import generation_prompt

    room = getattr(AutoConfig.from_pretrained(weights_folder(path)), "max_position_embeddings", None) or 4096
    prompt_ids = [tokenizer(generation_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    return prompt_ids, [max(1, min(max_new_tokens, room - len(ids))) for ids in prompt_ids], room


def vllm_generate(path: str, tokenizer, prompts: list[str], max_new_tokens: int, cfg: EvalConfig,
                  log_path: Path) -> list[str]:
    """The greedy continuation of each prompt by vLLM, stripped as HF generate's are."""
    prompt_ids, budgets, room = vllm_requests(path, tokenizer, prompts, max_new_tokens)
    if engine(cfg) == "vllm":
        texts = generate_in_process(path, prompt_ids, budgets, room)
    else:
        texts = generate_with_server(path, prompt_ids, budgets, room, cfg, log_path)
    return [t.strip() for t in texts]
