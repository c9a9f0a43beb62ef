"""The one config model, `DistillConfig`, and YAML preset loading.

Each stage owns a small section; the whole model is the `distill` flow's parameter, so the Prefect UI renders
it as a form. Unknown keys and bad values fail at once (`extra="forbid"`), and `ConfigError` names the key.
The defaults are the built-in offline default (synthetic data, reference teacher, tiny student from scratch,
CPU); method hyper-parameters take the papers' values.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError,
                      model_validator)

KPOD_PROMPT = "Q: {question}\nA: Let's think step by step."
ANSWER_PHRASE = "Therefore, the answer is {answer}."


class ConfigError(ValueError):
    """A user mistake in a config: the message names the key or path and what to do."""


def _fingerprint_mark(field: Any) -> Any:
    """`operational` (False) or `added_later` ("unless-default") on a field; None for the others."""
    extra = field.json_schema_extra
    return extra.get("fingerprint") if isinstance(extra, dict) else None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def _left_out(self) -> set[str]:
        """Fields no fingerprint sees: `operational` ones, and `added_later` ones at their default."""
        out = set()
        for name, f in type(self).model_fields.items():
            mark = _fingerprint_mark(f)
            if mark is False or (mark == "unless-default" and getattr(self, name) == f.get_default(call_default_factory=True)):
                out.add(name)
        return out

    def fingerprinted(self, exclude: set[str] = frozenset()) -> dict:
        """The section as its stage's fingerprint sees it: every field but those marked `operational` (how a stage
        is run or where its files go, not what it computes), `added_later` ones at their default, and `exclude`."""
        return self.model_dump(mode="json", exclude=self._left_out() | set(exclude))

    def fingerprint_form(self) -> dict:
        """The section as a fingerprint that hashes all of it sees it (storage/fingerprint.py `canonical`): every
        field but `added_later` ones at their default, at any depth."""
        skip = {name for name, f in type(self).model_fields.items()
                if _fingerprint_mark(f) == "unless-default"} & self._left_out()
        return {name: getattr(self, name) for name in type(self).model_fields if name not in skip}


def added_later(default: Any, **kwargs: Any) -> Any:
    """A `Field` added after its stage's fingerprints existed, whose default keeps the old behaviour: at that default
    it is left out of every fingerprint, so upgrading keystep recomputes nothing (e.g. train.token_weight_floor)."""
    return Field(default, json_schema_extra={"fingerprint": "unless-default"}, **kwargs)


def operational(default: Any = ..., **kwargs: Any) -> Any:
    """A `Field` left out of its stage's fingerprint: changing it never recomputes (or re-pays for) a stage output,
    e.g. the teacher's concurrency or retries, where vLLM comes from, where an export is uploaded."""
    if "default_factory" in kwargs:
        return Field(json_schema_extra={"fingerprint": False}, **kwargs)
    return Field(default, json_schema_extra={"fingerprint": False}, **kwargs)


class FlatFingerprint(Section):
    """A member of a discriminated union (dataset source, teacher backend) whose fingerprint is that of the one flat
    model the union replaced: every other member's field at its default, then its own values. So the union, which
    lets the UI form show only the fields that apply, changed no fingerprint: no dataset re-ingested, no teacher
    paid twice."""
    _flat_defaults: ClassVar[dict[str, Any]] = {}
    _flat_all_defaults: ClassVar[dict[str, Any]] = {}   # ... and the operational fields' too

    @model_validator(mode="before")
    @classmethod
    def _drop_flat_defaults(cls, data: Any) -> Any:
        """A config saved by the flat model (a run's resolved config, an older prefect.yaml) names every member's
        fields: those of other members left at their defaults are dropped; one set to a value stays an error."""
        if not isinstance(data, dict):
            return data
        flat = cls._flat_all_defaults
        return {k: v for k, v in data.items() if k in cls.model_fields or not (k in flat and flat[k] == v)}

    def setting(self, name: str) -> Any:
        """A field's value, or for a field of another member the flat model's default (what it recorded then)."""
        return getattr(self, name) if name in type(self).model_fields else self._flat_all_defaults[name]

    def fingerprinted(self, exclude: set[str] = frozenset()) -> dict:
        return {**{k: v for k, v in self._flat_defaults.items() if k not in exclude}, **super().fingerprinted(exclude)}


def _flatten(members: tuple[type[FlatFingerprint], ...]) -> None:
    """Give each member the flat model's defaults: the fields of all members (required ones were None there)."""
    flat: dict[str, Any] = {}
    for member in members:
        for name, f in member.model_fields.items():
            if name in ("source", "backend"):
                continue
            default = None if f.is_required() else f.get_default(call_default_factory=True)
            flat.setdefault(name, [d.model_dump(mode="json") if isinstance(d, BaseModel) else d for d in default]
                            if isinstance(default, list) else default)
    operational_fields = {name for member in members for name, f in member.model_fields.items()
                          if _fingerprint_mark(f) is False}
    for member in members:
        member._flat_all_defaults = flat
        member._flat_defaults = {k: v for k, v in flat.items() if k not in operational_fields}


def _as_any_of(schema: dict) -> None:
    """The union's JSON schema as `anyOf` — the form of Prefect's UI offers the members to pick from (it reads no
    `oneOf`)."""
    schema["anyOf"] = schema.pop("oneOf")
    schema.pop("discriminator", None)


def _tagged_union(field: str, tags: dict[str, str], default: str, members: tuple[type, ...], title: str):
    """A union told apart by `field` (`tags`: its value -> member tag; missing -> `default`); an unknown value is
    an error that lists the known ones."""
    def tag_of(value: Any) -> str | None:
        raw = value.get(field, default) if isinstance(value, dict) else getattr(value, field, default)
        return tags.get(raw, raw)

    known = ", ".join(tags)
    return Annotated[Union[tuple(Annotated[m, Tag(m.model_config["title"])] for m in members)],  # noqa: UP007
                     Discriminator(tag_of, custom_error_type=f"unknown_{field}",
                                   custom_error_message=f"{title} must be one of: {known}"),
                     Field(json_schema_extra=_as_any_of)]


class _DatasetCommon(FlatFingerprint):
    source: str = Field(description="Loader: synthetic:arith | gsm8k | svamp | file | hub.")   # first in dumps and forms
    name: str = Field("synthetic", description="Label used in the catalog and the results table.")
    split: str = Field("train", description="Split label; for hub sources also the split to load.")
    limit: int | None = Field(None, ge=1, description="Keep only the first N valid examples (None = all).")


class SyntheticDatasetSpec(_DatasetCommon):
    """Problems from keystep's arithmetic generator (offline, reproducible from the seed)."""
    model_config = ConfigDict(title="synthetic")
    source: Literal["synthetic:arith"] = Field("synthetic:arith", description="The synthetic:arith generator.")
    n: int = Field(2000, ge=1, description="Number of problems to generate.")
    seed: int = Field(0, description="Generator seed (same seed, same problems).")
    min_steps: int = Field(1, ge=1, le=5, description="Fewest arithmetic steps per problem.")
    max_steps: int = Field(5, ge=1, le=5, description="Most arithmetic steps per problem.")
    max_operand: int = Field(20, ge=2, description="Largest operand drawn for + and -.")

    @model_validator(mode="after")
    def _check(self) -> "SyntheticDatasetSpec":
        if self.min_steps > self.max_steps:
            raise ValueError("min_steps must be <= max_steps")
        return self


class FileDatasetSpec(_DatasetCommon):
    """A dataset read from a file (gsm8k / svamp in their own layouts, any jsonl/json/csv/parquet through the
    column mapping) or from the Hugging Face hub (an id or a local dataset folder)."""
    model_config = ConfigDict(title="file")
    source: Literal["gsm8k", "svamp", "file", "hub"] = Field(
        description="Loader: gsm8k / svamp files, a generic file (column mapping below), or a Hugging Face hub id.")
    path: str = Field(description="File (gsm8k, svamp, file) or hub id / local dataset dir (hub).")
    question_field: str = Field("question", description="file/hub: column holding the question (a nested key as "
                                "a.b, e.g. question.stem in CommonsenseQA's jsonl).")
    question_template: str | None = Field(None, description="file/hub: the question built from several columns, "
                                          "e.g. '{Body} {Question}' (ASDiv, SVAMP); replaces question_field.")
    answer_field: str = Field("answer", description="file/hub: column holding the gold answer.")
    rationale_field: str | None = Field(None, description="file/hub: column holding a reference rationale, if any.")
    choices_field: str | None = Field(None, description="file/hub: column holding answer choices, if any (a nested "
                                      "key as a.b): {label: [...], text: [...]} (hub CommonsenseQA), a list of {label, "
                                      "text} (CommonsenseQA jsonl), or a list of texts (labelled A, B, ...). The choices "
                                      "are shown in the prompt and answers are compared by label.")
    answer_type: Literal["number", "choice", "text"] = Field("number", description="How gold answers are normalised and compared.")

    @model_validator(mode="after")
    def _check(self) -> "FileDatasetSpec":
        if self.choices_field and self.answer_type != "choice":
            raise ValueError("choices_field needs answer_type: choice (answers are compared by label)")
        if self.question_template is not None:
            try:
                self.question_template.format_map(_AnyColumn())
            except (ValueError, IndexError) as err:
                raise ValueError(f"question_template {self.question_template!r} is not a format string: {err}") from None
        return self


_flatten((SyntheticDatasetSpec, FileDatasetSpec))
DatasetSpec = _tagged_union("source", {"synthetic:arith": "synthetic", "gsm8k": "file", "svamp": "file", "file": "file",
                                       "hub": "file"}, "synthetic:arith", (SyntheticDatasetSpec, FileDatasetSpec),
                            "source")


class _AnyColumn(dict):
    """Answers every column name, so a template's syntax can be checked before any file is read."""
    def __missing__(self, key):
        return ""


class DataConfig(Section):
    train: DatasetSpec = Field(default_factory=lambda: SyntheticDatasetSpec(name="synthetic", n=2000, seed=0),
                               description="The dataset the teacher labels and the student trains on.")
    eval: list[DatasetSpec] = Field(
        default_factory=lambda: [SyntheticDatasetSpec(name="synthetic", split="test", n=300, seed=1)],
        description="Evaluation sets (in-distribution and out-of-distribution).",
    )


class FewShotExample(Section):
    question: str = Field(description="Demonstration question.")
    rationale: str = Field(description="Demonstration rationale.")
    answer: str = Field(description="Demonstration answer.")


class _TeacherCommon(FlatFingerprint):
    """What every teacher backend has: the prompt and answer sentence (the student's too), samples, and bookkeeping."""
    backend: str = Field(description="reference | openai | vllm.")   # first in dumps and forms
    prompt_template: str = Field(KPOD_PROMPT, description="Prompt before the rationale (KPOD zero-shot CoT); {question} is filled in. It has two lines (a "
                                 "newline before `A:`): in the run form drag the box's corner to see both.")
    answer_template: str = Field(ANSWER_PHRASE, description="Sentence appended after the rationale; {answer} is filled in.")
    few_shot: list[FewShotExample] = Field(default_factory=list, description="Demonstrations placed before the question.")
    n_samples: int = Field(1, ge=1, description="Rationales per question (sample index 0..n-1).")
    keep_only_correct: bool = Field(True, description="Train only on rationales whose extracted answer matches gold.")
    max_consecutive_failures: int = operational(20, ge=1, description="Fail the task after this many requests in a row fail after retries (finished work is kept).")
    commit_every: int = operational(64, ge=1, description="Commit finished rationales to the catalog every N results.")
    shards: int = operational(1, ge=1, description="Split generation into N shards mapped over the task runner (Dask/Ray spread them).")

    @property
    def request_api(self) -> str:
        """What each request calls: `api`, or for a batch the endpoint its lines call."""
        return "completions"

    @property
    def batched(self) -> bool:
        """`api: batch`: the requests go as batches."""
        return False

    @property
    def retries_failed(self) -> bool:
        """A rerun asks again for items whose last attempt hit a protocol fault (never the dataset's own rationales)."""
        return False

    @property
    def prices(self) -> tuple[float | None, float | None]:
        """(prompt, completion) price per 1k tokens for the cost estimate."""
        return None, None


class ReferenceTeacherConfig(_TeacherCommon):
    """The dataset's own rationales (the offline default): nothing is asked of a model."""
    model_config = ConfigDict(title="reference")
    backend: Literal["reference"] = Field("reference", description="'reference' uses the dataset's own rationales "
                                          "(offline default); 'openai' any OpenAI-compatible endpoint (vllm serve, "
                                          "OpenAI, ...); 'vllm' in-process vllm.LLM if importable, else a vLLM server "
                                          "that keystep starts from teacher.vllm_python.")


class _ModelTeacher(_TeacherCommon):
    """A teacher model asked over the OpenAI protocol (or vLLM in-process): sampling, the API, retries."""
    model: str = Field(description="Model name (openai endpoint) or model folder / hub id (vllm).")
    api: Literal["completions", "chat", "batch"] = Field(
        "completions", description="Completions or chat API (chat applies the model's chat template); 'batch': the "
        "requests go as batches — through the OpenAI Batch API (files + batches endpoints; providers price it at "
        "about half) for backend openai, through vLLM's offline runner (run_batch, no server) for backend vllm — each "
        "line calling `batch_endpoint`. Online and batch rationales of one teacher are the same items: switching "
        "never pays twice.")
    batch_endpoint: Literal["completions", "chat"] = Field("completions", description="api batch: the endpoint each "
                                                           "request line calls (/v1/completions or /v1/chat/completions).")
    batch_poll_s: float = operational(30.0, gt=0, description="api batch: seconds between polls of a running batch.")
    batch_max_requests: int = operational(50_000, ge=1, description="api batch: most requests per batch (the OpenAI limit); "
                                          "more are split into several batches.")
    batch_max_bytes: int = operational(200 * 1024 * 1024, ge=1024, description="api batch: largest request file per "
                                       "batch (the OpenAI limit is 200 MB); more are split into several batches.")
    system_prompt: str | None = Field(None, description="chat: optional system message.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_tokens: int = Field(256, ge=1, description="Longest rationale in tokens.")
    stop: list[str] = Field(default_factory=lambda: ["\nQ:"], description="Stop sequences.")
    seed: int | None = Field(0, description="Sampling seed: per request (seed + sample index) over the API, LLM(seed=...) in-process.")
    per_request_seed: bool = Field(True, description="Send a per-request seed (turn off for servers that reject it).")
    concurrency: int = operational(16, ge=1, description="Requests in flight at once.")
    timeout_s: float = operational(120.0, gt=0, description="Per-request timeout in seconds.")
    max_retries: int = operational(5, ge=0, description="Retries (exponential backoff + jitter) on 429, 5xx, timeouts, connection errors and protocol faults (malformed or empty replies).")
    retry_failed: bool = operational(True, description="A rerun asks again for items whose last attempt ended in a "
                                     "protocol fault (malformed or empty reply after max_retries); items that succeeded "
                                     "are never asked again.")
    logprobs: int = operational(0, ge=0, le=100, description="Top-k log-probabilities kept for every generated token "
                                "(0 = off): the teacher's k likeliest tokens and their logprobs, asked as completions "
                                "`logprobs` or chat `top_logprobs` (OpenAI caps them at 5 and 20; vLLM at its "
                                "--max-logprobs, which keystep raises to k for a server it starts). Stored beside the "
                                "catalog; rationales stored before keep none (the teacher-scores stage scores those by "
                                "prefill) — switching it on never re-pays for text.")

    @model_validator(mode="after")
    def _check_logprobs(self) -> "_ModelTeacher":
        if self.logprobs and self.api == "batch":
            raise ValueError("teacher.logprobs is not kept for api 'batch' (its result lines are read as text only); "
                             "set teacher.logprobs: 0, or use api completions or chat")
        return self

    @property
    def request_api(self) -> str:
        return self.batch_endpoint if self.api == "batch" else self.api

    @property
    def batched(self) -> bool:
        return self.api == "batch"

    @property
    def retries_failed(self) -> bool:
        return self.retry_failed


class OpenAITeacherConfig(_ModelTeacher):
    """Any OpenAI-compatible endpoint: `vllm serve`, OpenAI, a provider."""
    model_config = ConfigDict(title="openai")
    backend: Literal["openai"] = Field(description="'openai': any OpenAI-compatible endpoint.")
    base_url: str = operational(description="Endpoint base URL, e.g. http://127.0.0.1:8000/v1.")
    batch_completion_window: str = operational("24h", description="api batch: the completion window asked for (the "
                                               "OpenAI Batch API accepts 24h).")
    api_key_env: str = operational("OPENAI_API_KEY", description="Environment variable holding the API key (never stored).")
    api_key_secret: str | None = operational(None, description="Name of a Prefect Secret block holding the API key (overrides api_key_env).")
    cost_per_1k_prompt_tokens: float | None = operational(None, ge=0, description="Optional price for the cost estimate.")
    cost_per_1k_completion_tokens: float | None = operational(None, ge=0, description="Optional price for the cost estimate.")
    cost_per_1k_prompt_tokens_batch: float | None = operational(None, ge=0, description="api batch: the batch price per 1k "
                                                                "prompt tokens, for the cost estimate.")
    cost_per_1k_completion_tokens_batch: float | None = operational(None, ge=0, description="api batch: the batch price "
                                                                    "per 1k completion tokens, for the cost estimate.")

    @property
    def prices(self) -> tuple[float | None, float | None]:
        if self.batched:
            return self.cost_per_1k_prompt_tokens_batch, self.cost_per_1k_completion_tokens_batch
        return self.cost_per_1k_prompt_tokens, self.cost_per_1k_completion_tokens


class VLLMTeacherConfig(_ModelTeacher):
    """vLLM here: in-process `vllm.LLM` when importable, else a server keystep starts (or `run_batch` for api batch)."""
    model_config = ConfigDict(title="vllm")
    backend: Literal["vllm"] = Field(description="'vllm': in-process vllm.LLM if importable, else a vLLM server that "
                                     "keystep starts from teacher.vllm_python.")
    vllm_python: str | None = operational(None, description="Python of a separate vLLM environment; keystep starts a server with it.")
    vllm_args: list[str] = operational(default_factory=list, description="Extra arguments for the vLLM server.")
    server_start_timeout_s: float = operational(600.0, gt=0, description="How long to wait for the server's health check.")

    @model_validator(mode="after")
    def _check(self) -> "VLLMTeacherConfig":
        if self.api == "batch" and self.batch_endpoint != "chat":
            raise ValueError("api 'batch' with backend 'vllm' runs vLLM's run_batch, which takes chat lines only; set "
                             "teacher.batch_endpoint: chat (the model's chat template applies)")
        return self


_flatten((ReferenceTeacherConfig, OpenAITeacherConfig, VLLMTeacherConfig))
TeacherConfig = _tagged_union("backend", {"reference": "reference", "openai": "openai", "vllm": "vllm"}, "reference",
                              (ReferenceTeacherConfig, OpenAITeacherConfig, VLLMTeacherConfig), "teacher.backend")
_SPECS, _TEACHERS = TypeAdapter(DatasetSpec), TypeAdapter(TeacherConfig)


def dataset_spec(**fields: Any) -> DatasetSpec:
    """The dataset spec these fields describe (its `source` picks the kind; synthetic:arith when absent)."""
    return _SPECS.validate_python(fields)


def teacher_config(**fields: Any) -> TeacherConfig:
    """The teacher config these fields describe (its `backend` picks the kind; reference when absent)."""
    return _TEACHERS.validate_python(fields)


class StepsConfig(Section):
    split_sentences: bool = Field(True, description="After newlines and numbered items, also split at sentence ends.")
    max_steps: int | None = Field(None, ge=1, description="Merge trailing steps so that no rationale has more than this many.")


class TokenWeightsConfig(Section):
    """KPOD §4.1 token weighting: which rationale tokens matter for predicting the answer (the top-k are the keypoints)."""
    compute: bool = Field(False, description="Run token weighting and step difficulty in the prepare phase (KPOD needs them; the Std-CoT baseline does not).")
    uniform: bool = Field(False, description="Ablation: no token weighting (every weight 1; the module is not trained).")
    alpha: float = Field(0.5, ge=0, description="α, weight of the mask-size penalty Lm (paper: 0.5).")
    mask_penalty: Literal["sum", "mean"] = Field(
        "sum", description="Lm per rationale: 'sum' Σ_j m_j over its tokens (the paper, eq. 6), or 'mean' (about L "
        "times weaker: the weights stay near init_keep; docs/measurements.md).")
    weighter_input: Literal["rationale", "sequence"] = Field(
        "rationale", description="What the weighting module's self-attention reads: the rationale tokens (the paper, "
        "e = Att(Emb(r))), or the whole training sequence (question, rationale and answer sentence).")
    gumbel_tau: float = Field(0.5, gt=0, description="Gumbel-sigmoid temperature.")
    estimator: Literal["straight_through", "relaxed", "score_function"] = Field(
        "straight_through", description="How the masks learn: 'straight_through' — hard 0/1 Gumbel-sigmoid masks with "
        "the relaxed sample's gradient through the predictor (the paper); 'relaxed' — the relaxed sample in [0, 1] "
        "itself; 'score_function' — hard Bernoulli masks, E[Lp] differentiated by REINFORCE with a leave-one-out "
        "baseline over `mask_samples` masks (no gradient through the predictor; why: docs/measurements.md) and Lm "
        "as the expected mask size Σ_j w_j.")
    mask_samples: int = Field(4, ge=2, description="score_function: masks sampled per example (the baseline of each "
                              "is the mean Lp of the others).")
    n_prefixes: int = Field(2, ge=1, description="Rationale prefixes (cut points at step ends) sampled per example for Lp.")
    lp_scale: Literal["all_prefixes", "sampled"] = Field(
        "all_prefixes", description="Lp of an example: 'all_prefixes' — the mean of its sampled prefix terms times its "
        "rationale's token count, in scale the paper's sum over every token prefix (eq. 5), which is what α = 0.5 is "
        "weighed against; 'sampled' — the sum of the sampled terms alone (about L / n_prefixes times smaller).")
    intermediate_target: Literal["answer", "next_result", "step_result"] = Field(
        "answer", description="What Lp asks the predictor for after a prefix that stops before the last step: the final "
        "answer (the paper), which such a prefix cannot contain; the next step's result (the last number that step "
        "states; the final answer when it states none), which the prefix's last result leads to; or 'step_result': "
        "the whole rationale asked for the answer plus sampled steps each cut just before the number it ends with and "
        "asked for that number (the step's sub-answer, which its operands and operator produce).")
    attention_heads: int = Field(4, ge=1, description="Heads of the weighting module's self-attention layer.")
    positions: Literal["none", "sinusoidal"] = Field(
        "none", description="What the weighting module's attention knows of order: 'none' (eq. 1: Att(Emb(r)), so two "
        "copies of one token — an operand and its copy in the step's opening words — always get one weight) or "
        "'sinusoidal' positions within the rationale, added to its queries and keys' input only (scaled to the "
        "embeddings' norm; the predictor still reads the plain embeddings).")
    mlp_hidden: int = Field(128, ge=1, description="Hidden width of the 2-layer weighting MLP.")
    predictor: str = Field("student", description="Answer predictor: 'student' (the student itself after "
                           "predictor_warmup_epochs of Std-CoT on the rationales, so it already reads them), 'scratch' "
                           "(a separate tiny causal LM), or an HF model folder / hub id.")
    predictor_kind: Literal["causal", "seq2seq"] = Field("causal", description="HF predictor type (seq2seq = FlanT5 as in the paper).")
    predictor_hidden: int = Field(128, ge=16, description="scratch predictor: width.")
    predictor_layers: int = Field(2, ge=1, description="scratch predictor: transformer blocks.")
    epochs: int = Field(4, ge=1, description="Passes over the rationales when learning the masks.")
    predictor_warmup_epochs: int = Field(6, ge=0, description="Epochs teaching the predictor to answer from unmasked "
                                         "rationales before the masks are learned ('student': Std-CoT epochs, shared "
                                         "with difficulty.warmup_epochs when equal; 'scratch': predictor-only epochs).")
    predictor_mask_epochs: int = Field(0, ge=0, description="Epochs teaching the predictor Lp on randomly masked "
                                       "rationales (each token kept with a probability drawn per example from 0.5-1) "
                                       "before the masks are learned, so that masking a token it does not need costs it "
                                       "nothing — the paper's predictor trains with the masks and learns that; a frozen "
                                       "one that has never seen a mask pays for every token masked (docs/measurements.md).")
    freeze_predictor: bool = Field(True, description="Keep the predictor fixed while the masks are learned, so the masks "
                                   "must keep what it reads (why: docs/measurements.md).")
    init_keep: float = Field(0.9, gt=0, lt=1, description="Initial weight of every token (bias of the MLP's output), so masks start open.")
    batch_size: int = Field(32, ge=1, description="Examples per step.")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate of the answer predictor.")
    weighter_lr: float = Field(1e-4, gt=0, description="AdamW learning rate of the weighting module (attention + MLP + "
                               "e_mask), lower than the predictor's so the masks do not collapse (why: docs/measurements.md).")
    top_k: int = Field(8, ge=1, description="Keypoints per rationale: the top-k tokens by weight.")
    seed: int = Field(0, description="Initialisation, prefix sampling and Gumbel noise seed.")


class DifficultyConfig(Section):
    """KPOD §4.2 step difficulty under the student before distillation."""
    weighted: bool = Field(True, description="Weight token NLLs by softmax-within-step of the token weights (False: plain mean NLL per step).")
    warmup_epochs: int = Field(1, ge=0, description="scratch student: epochs of Std-CoT warm-up so the scoring model is "
                               "not random noise (0 = none); shares the warm-up with token_weights.predictor_warmup_epochs "
                               "when equal (why one epoch: docs/measurements.md).")
    temperature: float = Field(1.0, gt=0, description="Temperature of eq. 7's softmax over a step's token weights "
                               "(paper: 1; below 1 the step's highest-weighted tokens dominate its difficulty).")
    batch_tokens: int = Field(8192, ge=64, description="Token budget per scoring batch (length-bucketed).")


class CurriculumConfig(Section):
    """KPOD §4.3 progressive curriculum: which examples give up one more input step at each stage."""
    progressive: bool = Field(True, description="False = ablation 'no progressive schedule': every stage trains on whole rationales.")
    diversity: bool = Field(True, description="False = ablation 'no diversity term' (β = 0).")
    beta: float = Field(12.0, ge=0, description="β, weight of the cluster-diversity term Σ_k sqrt(|C_k ∩ S|) (paper: 12).")
    clusters: int = Field(5, ge=1, description="K, K-means clusters of the questions (paper: 5).")
    step_size: int = Field(1, ge=1, description="Δs, input steps an example gives up when selected (paper: 1).")
    pace: float = Field(0.5, gt=0, description="p in the budget D(t) = u·t^(p+1)/(p+1) + C0 (paper: 0.5).")
    start_fraction: float = Field(0.3, ge=0, le=1, description="C0 as a fraction of the total difficulty B (paper: 0.3).")
    start: Literal["budget", "last_step"] = Field(
        "budget", description="c_i(0), which the paper leaves open: 'budget' — every step given as input, then the "
        "stage objective picks examples that generate their last step within D(0) = C0, so H(0) ≤ C0 as eq. 8 has it; "
        "'last_step' — c_i(0) = n_i − 1 for every example (H(0) is then ~0.5·B on synthetic:arith, above D(1), and "
        "the first stage selects nothing).")
    embedding: Literal["tfidf", "sentence-model"] = Field("tfidf", description="Question embedding for the clusters: TF-IDF + SVD, or a sentence-embedding model (through sentence-transformers when installed, else the HF encoder with mean pooling).")
    embedding_model: str | None = Field(None, description="sentence-model: model folder or hub id (e.g. sentence-transformers/all-MiniLM-L6-v2).")
    svd_dim: int = Field(64, ge=2, description="tfidf: truncated-SVD dimensions.")
    seed: int = Field(0, description="K-means and SVD seed.")


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="Adapter scale numerator (the update is scaled by alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Names of the linear layers that get adapters (peft's target_modules; Llama-style names).")
    quantize: Literal["none", "4bit"] = Field("none", description="'4bit': QLoRA — the frozen base weights in NF4 "
                                              "through bitsandbytes (install keystep[gpu]); 'none': the base in "
                                              "train.precision.")
    merge: bool = Field(True, description="Also write the final epoch merged into a full model folder, which "
                        "evaluation and vLLM load; off: they load the base with the adapter.")


class StudentConfig(Section):
    model: str = Field("scratch", description="'scratch' (tiny Llama-style model + BPE tokenizer trained on the corpus) or an HF causal LM path / hub id.")
    vocab_size: int = Field(1024, ge=260, description="scratch: BPE vocabulary size.")
    hidden_size: int = Field(128, ge=16, description="scratch: model width.")
    num_layers: int = Field(4, ge=1, description="scratch: transformer blocks.")
    num_heads: int = Field(4, ge=1, description="scratch: attention heads (hidden_size must divide evenly).")
    intermediate_size: int = Field(512, ge=16, description="scratch: MLP width.")
    max_length: int = Field(256, ge=32, description="Longest sequence (prompt + rationale + answer) in tokens.")
    seed: int = Field(0, description="scratch: weight initialisation seed.")
    tokenizer: str | None = added_later(None, description="scratch: instead of a tokenizer trained on the corpus, the "
                                        "tokenizer of a model folder, or of the scratch student a preset (`.yaml`) makes "
                                        "— a teacher built to share its student's vocabulary (logit distillation).")
    lora: LoraConfig | None = Field(None, description="Train LoRA adapters (peft) on a frozen student instead of all "
                                    "its weights; unset: full fine-tuning.")

    @model_validator(mode="after")
    def _check(self) -> "StudentConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.tokenizer and self.model != "scratch":
            raise ValueError("student.tokenizer applies to a scratch model (a model folder brings its own); unset it")
        return self


# The Mysteries target formats (Wadhwa et al. 2024), defined once: training's target, export's SFT layouts
TargetFormat = Literal["cot_then_label", "label_only", "label_then_cot", "label_then_shuffled_cot", "label_then_keytokens"]
# those whose target starts with the answer: evaluation decodes only the answer sentence
LABEL_FIRST = tuple(f for f in get_args(TargetFormat) if f.startswith("label_"))


class KDConfig(Section):
    """Logit distillation (`train.loss: kd`): per token, (1 − α)·NLL + α·τ²·KL(teacher top-k ‖ student)."""
    alpha: float = Field(0.5, ge=0, le=1, description="α: the KL term's share of the loss (0: plain NLL, Std-CoT).")
    temperature: float = Field(1.0, gt=0, description="τ: both distributions softened by it; the KL is scaled by τ² "
                               "so its gradients keep their size (Hinton et al. 2015).")


class OnPolicyConfig(Section):
    """On-policy distillation (`train.loss: on_policy`; GKD, Agarwal et al. 2024): at each optimiser step, with
    probability λ the student samples completions for the step's questions and is trained toward the teacher's
    distribution on every token it wrote; else on the teacher's stored rationales. The loss per token is the
    generalized Jensen-Shannon divergence over the teacher's top-k plus one tail bucket (README: On-policy
    distillation)."""
    lmbda: float = Field(0.5, ge=0, le=1, description="λ: the probability that an optimiser step trains on completions "
                         "the current student samples (else on the teacher's stored rationales); 0: the same divergence "
                         "on the teacher's text only. GKD's and TRL's default, 0.5.")
    beta: float = Field(1.0, ge=0, le=1, description="β of the generalized Jensen-Shannon divergence (GKD §3, TRL's "
                        "generalized_jsd_loss): 0 the forward KL(teacher ‖ student), 1 the reverse KL(student ‖ teacher), "
                        "between them JSD(β). 1 (reverse KL), the per-token loss of the on-policy distillation write-ups "
                        "and the Qwen3 report: mode-seeking, it penalises what the student writes that the teacher "
                        "would not.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the student's completions (1: its own "
                               "distribution, what GKD samples).")
    max_new_tokens: int = Field(96, ge=1, description="Most tokens a sampled completion has (also capped by "
                                "student.max_length).")
    sft_epochs: int = added_later(0, ge=0, description="Epochs of Std-CoT first — the NLL on the teacher's stored "
                                  "rationales, nothing sampled or scored — then the on-policy ones, in the same run and "
                                  "learning-rate schedule: GKD and the on-policy distillation recipes start from a "
                                  "supervised fine-tuned student. 0: on-policy from the first epoch.")


class TrainConfig(Section):
    """Student training, grouped as TRL's SFTConfig is: what to train on, the loss, batching, the optimiser and its
    schedule, precision and kernels, processes."""
    # ---- what to train on and how long -----------------------------------------------------------------------
    loss: Literal["std_cot", "kpod", "kd", "kpod_kd", "on_policy"] = Field(
        "std_cot", description="'std_cot': plain NLL on rationale + answer. 'kpod': token-weighted NLL on the rationale "
        "+ NLL on the answer, stage by stage through the curriculum (computes token weights and difficulty). 'kd': NLL "
        "mixed with the KL to the teacher's top-k distribution at every token (train.kd; needs teacher_scores.model). "
        "'kpod_kd': KPOD's curriculum with kd's loss, each token's NLL and KL multiplied by its learned weight. "
        "'on_policy': GKD — a share train.on_policy.lmbda of the steps on the student's own samples, every token scored "
        "by the teacher (teacher_scores), the loss the divergence to the teacher's top-k (train.on_policy).")
    target_format: TargetFormat = Field(
        "cot_then_label", description="Mysteries target format: rationale then answer (standard); the answer only; the "
        "answer then the rationale (at test time only the answer is decoded); the answer then the rationale's words "
        "shuffled; the answer then the top-k keypoint tokens by learned weight (computes token weights).")
    epochs: int = Field(10, ge=1, description="Passes over the training rationales.")
    match_cot_tokens: bool = Field(False, description="For formats other than cot_then_label: scale the epochs so the "
                                   "student trains on as many tokens as `epochs` passes of cot_then_label sequences.")
    seed: int = Field(0, description="Data order and dropout seed.")

    # ---- the loss (KPOD token weights) -----------------------------------------------------------------------
    token_weight_scale: Literal["raw", "sequence_mean"] = Field(
        "raw", description="KPOD loss: 'raw' multiplies each rationale token's NLL by its learned weight in [0, 1] "
        "(the paper); 'sequence_mean' rescales a sequence's weights so their mean over its supervised tokens is 1, so "
        "the weights reorder the loss within a sequence without shrinking its size (the learning rate).")
    token_weight_floor: float = added_later(0.0, ge=0, le=1, description="KPOD loss: each rationale token's NLL weighted "
                                      "f + (1 − f)·w_j instead of w_j (f = 0, the paper). Near-0/1 token weights leave a "
                                      "student trained from scratch untaught on the words it must still write between "
                                      "the keypoints (docs/measurements.md); a floor keeps them in the loss.")

    kd: KDConfig = added_later(KDConfig(), description="loss kd: the KL term's weight α and temperature τ.")
    on_policy: OnPolicyConfig = added_later(OnPolicyConfig(), description="loss on_policy: the share of steps on the "
                                            "student's own samples λ, the divergence's β, the sampling temperature.")

    # ---- batching --------------------------------------------------------------------------------------------
    batch_size: int = Field(32, ge=1, description="Sequences per micro-batch (when tokens_per_batch is unset).")
    tokens_per_batch: int | None = Field(None, ge=1, description="Batches by tokens: a micro-batch takes sequences "
                                         "(in the epoch's order) while their tokens fit this budget; unset: "
                                         "batch_size sequences.")
    packing: bool = Field(True, description="Pack a micro-batch's sequences end to end into rows of pack_length "
                          "tokens, with per-sequence position ids and no attention across their borders (no padding "
                          "compute); off: one right-padded sequence per row. The loss is the same either way.")
    pack_length: int | None = Field(None, ge=16, description="Row length for packing; unset: 2 x student.max_length.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimiser step.")
    allow_truncation: bool = Field(False, description="Train even when more than 20% of the sequences are cut at "
                                   "student.max_length (more than 5% always warns, on the terminal and in the report).")

    # ---- optimiser (AdamW) -----------------------------------------------------------------------------------
    lr: float = Field(3e-3, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")

    # ---- schedule (linear warm-up, cosine decay) -------------------------------------------------------------
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of steps with linear warm-up.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decay floor as a fraction of lr.")

    # ---- precision and kernels -------------------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device of every model stage (warm-up, token "
                                                   "weights, difficulty, training, evaluation): 'auto' uses CUDA (bf16 "
                                                   "training) when present, else CPU.")
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16"] = Field(
        "auto", description="'fp32'; 'bf16-mixed': fp32 weights, bf16 autocast; 'bf16': weights in bf16 (with LoRA: "
        "the frozen base; the adapters stay fp32); 'auto': bf16-mixed on CUDA, fp32 on CPU.")
    compile: Literal["auto", "on", "off"] = Field("auto", description="torch.compile the model: 'auto' on CUDA only "
                                                  "(on CPU its compile time outweighs its gain at the demo's size).")
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "auto", description="Attention kernel for training (each takes packed rows: the borders come from the position "
        "ids). 'auto': flash_attention_2 (varlen, no O(row²) mask) on CUDA when the flash-attn package imports, else "
        "sdpa. flex_attention trains on CUDA only (no CPU backward).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: much less "
                                         "memory for ~30% more compute (large students, LoRA on 7B).")

    # ---- processes -------------------------------------------------------------------------------------------
    num_processes: int = Field(1, ge=1, description="Training processes (one per GPU), launched by torchrun as a "
                               "subprocess of the training task; on CPU they use the gloo backend.")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="With num_processes > 1: 'ddp' replicates the model, "
                                             "'fsdp' shards weights, gradients and optimizer state (FSDP2).")

    @property
    def uses_kpod(self) -> bool:
        """KPOD's token weights and curriculum shape the loss ('kpod', 'kpod_kd')."""
        return self.loss in ("kpod", "kpod_kd")

    @property
    def uses_teacher_scores(self) -> bool:
        """The loss reads the teacher's top-k distributions ('kd', 'kpod_kd', 'on_policy')."""
        return self.loss in ("kd", "kpod_kd", "on_policy")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.loss != "std_cot" and self.target_format != "cot_then_label":
            raise ValueError(f"loss '{self.loss}' trains on rationale-then-answer targets; set target_format: "
                             "cot_then_label or loss: std_cot")
        if self.loss == "on_policy" and self.num_processes > 1:
            raise ValueError("train.loss 'on_policy' samples the student in the training process: set "
                             "train.num_processes: 1 (sampling across several processes is not built)")
        if self.loss == "on_policy" and self.on_policy.sft_epochs >= self.epochs:
            raise ValueError(f"train.on_policy.sft_epochs ({self.on_policy.sft_epochs}) leaves no on-policy epoch of "
                             f"train.epochs ({self.epochs}): set it below train.epochs, or train.loss: std_cot")
        return self




class EvalConfig(Section):
    backend: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="Decoding engine: 'vllm' — vllm.LLM in this process when vLLM imports here, else a vLLM "
        "server keystep starts from eval.vllm_python (serving the student folder, or its base + LoRA adapter); 'hf' — "
        "transformers generate; 'auto' — vllm when it imports here or eval.vllm_python is set, else hf. Same greedy "
        "decoding and the same predictions table either way.")
    vllm_python: str | None = operational(None, description="vllm: Python of a separate vLLM environment (e.g. "
                                    ".venv-vllm/bin/python); keystep starts a server with it.")
    vllm_args: list[str] = Field(default_factory=list, description="vllm: extra engine arguments (server flags, e.g. "
                                 "['--dtype', 'float32']).")
    server_start_timeout_s: float = operational(600.0, gt=0, description="vllm server: how long to wait for its health check.")
    concurrency: int = operational(64, ge=1, description="vllm server: requests in flight.")
    max_new_tokens: int = Field(96, ge=1, description="Greedy decoding length limit.")
    label_max_new_tokens: int = Field(16, ge=1, description="Label-first target formats: tokens decoded for the answer sentence (only the label is decoded).")
    batch_size: int = Field(64, ge=1, description="Prompts per generation batch.")
    tolerance: float = Field(1e-4, ge=0, description="Relative tolerance for numeric answers.")
    include_untrained: bool = Field(True, description="Also evaluate the student before training, as a baseline.")
    curve_questions: int = added_later(100, ge=0, description="Learning curve: every epoch's checkpoint answers the "
                                       "first N questions of the first evaluation set (greedy, HF generate), plotted "
                                       "beside the training loss — for watching a run, not for choosing an epoch (tune "
                                       "on a validation split); 0: off.")




class TeacherScoresConfig(Section):
    """A model teacher's token distributions over the student's training sequences (issue 30's `teacher-scores`):
    its top-k next-token log-probabilities at every position, for logit distillation."""
    model: str | None = Field(None, description="Teacher model folder that scores the student's training sequences "
                              "(it must share the student's tokenizer); unset: no scores.")
    k: int = Field(20, ge=1, le=100, description="Top-k log-probabilities kept per position.")
    engine: Literal["local", "vllm"] = Field("local", description="'local': a forward pass of the teacher folder on "
                                     "train.device (exact; prefill only). 'vllm': vLLM's `prompt_logprobs` (prefill "
                                     "only) from a server keystep starts (teacher_scores.vllm_python) or one at "
                                     "teacher_scores.server_url (named so in the UI form apart from the teacher's base_url).")
    vllm_python: str | None = operational(None, description="engine vllm: Python of a separate vLLM environment "
                                          "(e.g. .venv-vllm/bin/python); keystep serves teacher_scores.model with it.")
    vllm_args: list[str] = operational(default_factory=list, description="engine vllm: extra vLLM server arguments "
                                       "(keystep adds --max-logprobs k unless given).")
    server_url: str | None = operational(None, description="engine vllm: a vLLM server already serving "
                                       "teacher_scores.model (its --served-model-name must be that path).")
    concurrency: int = operational(8, ge=1, description="engine vllm: requests in flight.")
    max_retries: int = operational(4, ge=0, description="engine vllm: retries of a failed request (429, 5xx, "
                                   "timeouts) with backoff; then the stage stops, its finished parts kept.")
    batch_tokens: int = operational(8192, ge=64, description="Tokens per scoring batch (padding included).")
    commit_every: int = operational(256, ge=1, description="Sequences per Parquet part: a kill loses at most the part "
                                    "in flight.")


class ExportConfig(Section):
    """The distilled dataset as files: Hugging Face `datasets` folders, Parquet, SFT layouts and a dataset card."""
    enabled: bool = operational(False, description="Run the export as the last stage of `distill` (`keystep export` and "
                          "the export flow run it on their own).")
    out: str | None = Field(None, description="Folder to write (replaced as a whole, by rename); unset: "
                            "`<workspace>/exports/<export fingerprint>`.")
    rows: Literal["kept", "all"] = Field("kept", description="'kept': the rationales the student trains on; 'all': "
                                         "every rationale, failed and wrong ones too, with status and reason.")
    formats: list[TargetFormat] = Field(
        default_factory=lambda: ["cot_then_label", "label_then_cot"],
        description="Target formats of the SFT layouts (prompt/completion and chat messages, as TRL's SFTTrainer reads "
        "them), each built by tasks/formats.py exactly as keystep trains on it; label_then_keytokens needs token weights.")
    license: str | None = Field(None, description="License field of the dataset card (e.g. cc-by-4.0); unset: 'other'.")
    pretty_name: str | None = Field(None, description="Dataset card title; unset: `<dataset> rationales (<teacher>)`.")
    push_to_hub: str | None = operational(None, description="Hugging Face dataset repo id to upload the folder to (needs a "
                                    "token in hub_token_env and a network).")
    hub_token_env: str = operational("HF_TOKEN", description="Environment variable holding the Hugging Face token (never "
                               "stored or logged).")
    private: bool = operational(True, description="push_to_hub: create the repo private.")


class StorageConfig(Section):
    workspace: str = Field(".keystep", description="Folder for the catalog, models, checkpoints and cached results.")


class DistillConfig(Section):
    """The flow parameter: one section per stage."""
    # what most runs change comes first (the deployment form lists the sections in this order); the KPOD-only
    # sections follow, so a Std-CoT run's form shows its loss and epochs on the first screens
    data: DataConfig = Field(default_factory=DataConfig, description="Datasets to distil on and evaluate on.")
    teacher: TeacherConfig = Field(default_factory=ReferenceTeacherConfig, description="Teacher rationale generation.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Student training: loss, epochs, batching, optimiser.")
    student: StudentConfig = Field(default_factory=StudentConfig, description="The student model.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    steps: StepsConfig = Field(default_factory=StepsConfig, description="Rationale step splitting.")
    token_weights: TokenWeightsConfig = Field(default_factory=TokenWeightsConfig, description="KPOD token weighting (train.loss: kpod).")
    difficulty: DifficultyConfig = Field(default_factory=DifficultyConfig, description="KPOD step difficulty (train.loss: kpod).")
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig, description="KPOD progressive curriculum (train.loss: kpod).")
    teacher_scores: TeacherScoresConfig = Field(default_factory=TeacherScoresConfig, description="A model teacher's "
                                                "top-k token distributions over the training sequences.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="The distilled dataset as files (optional last stage).")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Where results live.")

    # ---- which stages a run has: the DAG's shape, read by flows/distill.py ------------------------------
    @property
    def needs_token_weights(self) -> bool:
        """KPOD training and the key-token target format read token weights; `token_weights.compute` asks for them."""
        return (self.token_weights.compute or self.train.uses_kpod
                or self.train.target_format == "label_then_keytokens")

    @property
    def needs_curriculum(self) -> bool:
        """KPOD training reads its stage's curriculum shard every epoch."""
        return self.train.uses_kpod

    @property
    def predictor_warmup_epochs(self) -> int:
        """Epochs of Std-CoT for the student the token weights read: warmed up only when it is the answer predictor."""
        tw = self.token_weights
        return tw.predictor_warmup_epochs if tw.predictor == "student" and not tw.uniform else 0

    @property
    def scorer_warmup_epochs(self) -> int:
        """Epochs of Std-CoT for the student that scores difficulty: a pretrained student scores as it is (§4.2)."""
        return self.difficulty.warmup_epochs if self.student.model == "scratch" else 0

    @model_validator(mode="after")
    def _check_sections(self) -> "DistillConfig":
        lora, train = self.student.lora, self.train
        if train.uses_teacher_scores and not self.teacher_scores.model:
            raise ValueError(f"train.loss '{train.loss}' trains toward a teacher's token distributions: set teacher_scores.model "
                             "to the teacher's folder (it must share the student's tokenizer)"
                             + ("; the reference teacher (an answer key) has none, and on_policy needs a teacher that "
                                "scores the student's own samples" if train.loss == "on_policy" else ""))
        if lora and lora.quantize == "4bit" and train.num_processes > 1 and train.strategy == "fsdp":
            raise ValueError("student.lora.quantize '4bit' cannot be sharded by train.strategy 'fsdp' (FSDP does not "
                             "shard bitsandbytes' 4-bit weights); use train.strategy: ddp, or quantize: none")
        return self


UNION_TAGS = {"synthetic": "dataset source synthetic:arith", "file": "dataset sources gsm8k / svamp / file / hub",
              "reference": "teacher backend reference", "openai": "teacher backend openai", "vllm": "teacher backend vllm"}


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    tag = next((str(p) for p in first["loc"] if p in UNION_TAGS), None)   # a union's member (pydantic's loc names it)
    key = ".".join(str(p) for p in first["loc"] if p not in UNION_TAGS) or "(top level)"
    msg = first["msg"]
    if first["type"] == "missing" and tag and isinstance(first.get("input"), dict):
        field = "source" if tag in ("synthetic", "file") else "backend"
        missing = [e["loc"][-1] for e in err.errors() if e["type"] == "missing" and e["loc"][:-1] == first["loc"][:-1]]
        key = ".".join(str(p) for p in first["loc"][:-1] if p not in UNION_TAGS)
        msg = (f"{field} '{first['input'].get(field)}' needs " + " and ".join(f"'{m}'" for m in missing) + "; set "
               + ", ".join(f"{key}.{m}" for m in missing))
    if first["type"] == "extra_forbidden":
        msg = "unknown key; check the spelling against `keystep config` (every key with its value) or configs/demo.yaml"
        if tag:
            msg = (f"not a setting of {UNION_TAGS[tag]} (each source / backend has its own keys; `keystep config` "
                   "shows them); remove it or change the source / backend")
    return f"config key '{key}': {msg}"


RENAMED = {"masks": "token_weights"}


def _renamed(raw: dict) -> None:
    for old, new in RENAMED.items():
        if old in raw:
            raise ConfigError(f"config key '{old}': renamed to '{new}'; rename the section (same keys inside)")


def parse_value(text: str) -> Any:
    """A --set value: YAML scalars/lists (so 3, 0.1, true, null, [a, b] work), else the raw string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """Apply dotted-key overrides ({"train.epochs": 3}) to a raw config dict."""
    raw = dict(raw)
    for dotted, value in overrides.items():
        node = raw
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"config key '{dotted}': '{part}' is not a section")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return raw


def build_config(raw: dict | None = None, overrides: dict[str, Any] | None = None) -> DistillConfig:
    raw = apply_overrides(raw or {}, overrides or {})
    _renamed(raw)
    try:
        return DistillConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


def read_yaml(path: str | Path, what: str, example: str, shape: str) -> dict:
    """A YAML file that must hold a mapping; a missing file or bad YAML is a `ConfigError` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} '{p}' not found; see {example}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{what} '{p}' is not valid YAML: {problem}{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} '{p}' must hold {shape}")
    return raw


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> DistillConfig:
    raw = read_yaml(path, "config file", "configs/demo.yaml", "a mapping of sections (data, teacher, ...)") \
        if path is not None else {}
    try:
        return build_config(raw, overrides)
    except ConfigError as err:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{err}") from None


# ---- experiment grids ---------------------------------------------------------------------------------
class ExperimentConfig(Section):
    """A grid of named variants (config overrides on one base preset) × seeds, run by the `experiment` flow."""
    name: str = Field("experiment", description="Title of the comparison table and report.")
    base: str = Field("configs/demo.yaml", description="Base distill preset (path relative to the working directory).")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted-key overrides applied to every arm.")
    variants: dict[str, dict[str, Any]] = Field(description="Arm name -> dotted-key overrides, e.g. {kpod: {train.loss: "
                                                "kpod}}; the key `base` names another preset for that arm (e.g. "
                                                "{kpod: {base: configs/kpod.yaml}}).")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1, description="Seeds per arm.")
    seed_keys: list[str] = Field(default_factory=lambda: ["train.seed"], description="Config keys set to the seed "
                                 "(train.seed: data order; upstream stages stay shared across seeds).")
    results_path: str | None = Field(None, description="Markdown results file the flow writes (e.g. docs/results.md); "
                                     "several studies can share one file, each rewriting only its own section.")
    study_dir: str | None = Field(None, description="Folder of the per-run result files (a summary and per-question "
                                  "predictions for each variant × seed; default `docs/studies/<experiment file name>`). "
                                  "A run whose files exist is not run again, and `keystep report` rebuilds the report "
                                  "from these files alone.")
    variant_seeds: dict[str, list[int]] = Field(default_factory=dict, description="Seeds of particular variants "
                                                "(e.g. fewer for ablations); the others run `seeds`.")
    pretrain: str | None = Field(None, description="A distill preset run first (once, cached in its own workspace) "
                                 "whose trained student is every arm's student.model: a student that already writes "
                                 "steps, fixed across seeds.")
    teacher_preset: str | None = Field(None, description="A distill preset run first (once, cached in its own "
                                       "workspace) whose trained student is every arm's model teacher: teacher.model "
                                       "(the arms' teacher backend must be a model one, e.g. vllm) and, for arms whose "
                                       "train.loss reads teacher distributions (kd, kpod_kd), teacher_scores.model. "
                                       "Regime R3: configs/teacher-arith.yaml.")
    gaps: list[tuple[str, str]] = Field(default_factory=list, description="Variant pairs (a, b) whose accuracy gap the "
                                        "report states, and whether it exceeds the seed spread.")

    def seeds_of(self, variant: str) -> list[int]:
        return self.variant_seeds.get(variant, self.seeds)

    def plan(self) -> list[tuple[str, int]]:
        """(variant, seed) in run order: seed by seed, so the arms of a paired comparison finish together."""
        every = sorted({s for v in self.variants for s in self.seeds_of(v)})
        return [(v, s) for s in every for v in self.variants if s in self.seeds_of(v)]


def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """An experiment file, with every arm's config validated up front (a bad arm names itself)."""
    p = Path(path)
    raw = read_yaml(p, "experiment file", "configs/study-synthetic.yaml", "a mapping (name, base, variants, seeds, ...)")
    try:
        exp = ExperimentConfig.model_validate(apply_overrides(raw, overrides or {}))
    except ValidationError as err:
        raise ConfigError(f"{p}: {_describe(err)}") from None
    repo = p.resolve().parent.parent            # configs/x.yaml: paths resolve against the experiment file's repo
    for key in ("base", "pretrain", "teacher_preset"):
        value = getattr(exp, key)
        if value and not Path(value).is_absolute() and not Path(value).exists() and (repo / value).exists():
            setattr(exp, key, str((repo / value).resolve()))
    for name, arm in exp.variants.items():
        value = arm.get("base")
        if value and not Path(value).is_absolute() and not Path(value).exists() and (repo / value).exists():
            exp.variants[name] = {**arm, "base": str((repo / value).resolve())}
    if exp.study_dir is None:
        exp.study_dir = str(repo / "docs" / "studies" / p.stem)
    unknown = sorted(set(exp.variant_seeds) - set(exp.variants))
    if unknown:
        raise ConfigError(f"{p}: variant_seeds names {unknown}, which are not variants ({sorted(exp.variants)})")
    for preset in (exp.pretrain, exp.teacher_preset):
        if preset:
            load_config(preset)
    for variant, seed in exp.plan():
        try:
            arm_config(exp, variant, seed)
        except ConfigError as err:
            raise ConfigError(f"{p}: variant '{variant}': {err}") from None
    return exp


def arm_config(exp: ExperimentConfig, variant: str, seed: int, student_model: str | None = None,
               teacher_model: str | None = None) -> DistillConfig:
    """The distill config of one arm: base preset + shared overrides + the variant's + the seed (+ the pretrained
    student's folder, once the `pretrain` preset has trained it; + the model teacher's folder, once `teacher_preset`
    has trained it — until then the preset's path stands in for it)."""
    pretrained = {"student.model": student_model} if student_model else {}
    arm = dict(exp.variants[variant])
    base = arm.pop("base", exp.base)
    overrides = {**exp.overrides, **arm, **{k: seed for k in exp.seed_keys}, **pretrained}
    if not exp.teacher_preset:
        return load_config(base, overrides)
    teacher = {"teacher.model": teacher_model or exp.teacher_preset}
    config = load_config(base, {**overrides, **teacher, "teacher_scores.model": teacher_model or exp.teacher_preset})
    return config if config.train.uses_teacher_scores else load_config(base, {**overrides, **teacher})

