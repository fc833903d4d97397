"""The settings of the model-side stages (train, evaluate, export) and the one friendly validator of a
settings file: the contracts that the CLI, the nightly flow, the tasks and the deployments' UI forms share.

They live apart from `doctune/settings.py` (the build stages' settings) on purpose: every build task's
cache key digests that file, so a new word in a training field's description must not re-synthesize
every document. A run folder is named after `settings_hash(TrainSettings)` (doctune/runs.py), so the
fields' names, order, types and defaults are part of that name: change them knowingly.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from doctune.settings import LLMSettings

M = TypeVar("M", bound=BaseModel)

# ------------------------------------------------------------------------------------------- train


class TrainSettings(BaseModel):
    # A misspelt key must fail loudly instead of silently keeping the default.
    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(
        "", description="Local folder or HF id of the model to fine-tune; empty: the offline SmolLM2-135M-Instruct."
    )
    system_prompt: str | None = Field(
        None, description="Replaces the dataset's system message in every example; None keeps the dataset's."
    )
    max_seq_len: int = Field(
        512, ge=16, le=131072, description="Examples longer than this (in tokens) are dropped with a reason."
    )
    lora_r: int = Field(16, ge=1, le=1024, description="LoRA rank: more capacity and memory as it grows.")
    lora_alpha: float = Field(32, gt=0, description="LoRA scale numerator (the update is scaled by alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input (regularises small data).")
    fast_lora_dropout: bool = Field(
        True,
        description="One LoRA dropout mask per input tensor, shared by the projections that read it (q/k/v, "
        "gate/up; as peft does for a fused qkv projection), cut from 64-bit random words on a CPU (p rounded to "
        "1/65536): a CPU step ~15-25% faster. False: peft's own nn.Dropout in every module.",
    )
    target_modules: str | list[str] = Field(
        "all-linear", description="'all-linear' (every projection but the output head) or a list of module names."
    )
    learning_rate: float | None = Field(
        None, gt=0, le=1, description="Peak learning rate after warmup; None: by the base model's size (SMALL_MODEL): "
        "1e-3 under a billion parameters (SmolLM2-135M learnt the sample folder at 1e-3 and far less at 2e-4, "
        "bench/README.md), else 2e-4 (the QLoRA paper's rate for 7B-13B models).",
    )
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate decay after warmup."
    )
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of the steps spent ramping the learning rate up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the LoRA weights.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradients are clipped to this global norm.")
    max_steps: int = Field(
        0, ge=0, description="Optimizer steps to run, whatever the dataset's size; 0: num_epochs decides, so a folder "
        "twice as big trains about twice as long.")
    num_epochs: float | None = Field(
        6.0, gt=0, description="Passes over the training rows (question/answer rows, and the text rows when text_rows "
        "mixes them in), used when max_steps is 0. 6: the sample folder's ~380 rows at batch 8 in ~290 steps, the "
        "length measured best for SmolLM2-135M (bench/README.md).",
    )
    per_device_batch_size: int = Field(8, ge=1, description="Examples per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    batching: Literal["packed", "length_grouped", "padded"] = Field(
        "packed",
        description="packed: each micro-batch's examples share rows without padding (attention kept apart by "
        "position ids); length_grouped: similar lengths batched together, padded; padded: random order, padded.",
    )
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in the backward pass: less memory, ~25% slower."
    )
    save_every_steps: int = Field(20, ge=0, description="Checkpoint interval for resuming; 0: never.")
    neftune_alpha: float | None = Field(
        None, ge=0, le=100,
        description="NEFTune: uniform noise of size alpha / sqrt(sequence length x hidden size) on the input "
        "embeddings while training, so the model does not lean on the exact tokens of its training questions; "
        "0: off; None: by the base model's size, 15 under a billion parameters (measured on SmolLM2-135M), else 0 "
        "(not measured on larger models here).",
    )
    text_rows: bool = Field(
        False, description="Train on the dataset's text-completion rows too (text.jsonl: the documents' own text, loss on every "
        "token), mixed with the question/answer rows. Off until bench/knowledge.py shows it raises paraphrased "
        "recall on both bench corpora over several seeds.",
    )
    text_rows_unwritten: bool = Field(
        False, description="With text_rows off: train on the text rows of the languages the dataset's endpoint wrote "
        "no questions in (the offline 135M model writes no Chinese, so a Chinese fact has rule-made questions only), "
        "mixed with the question/answer rows; the steps grow with them. Off until bench/knowledge.py shows it "
        "raises paraphrased recall in those languages on both bench corpora without costing English.",
    )
    no_system_share: float = Field(
        0.0, ge=0, le=1, description="Share of question/answer rows trained without their system message (the "
        "chat template's own default then stands in), drawn with the seed, so an exported model also answers "
        "clients that send none. doctune serve adds the trained system prompt to such requests itself. 0 until "
        "bench/knowledge.py shows the share costs nothing under the trained prompt.",
    )
    min_rows_per_answer: int = Field(
        0, ge=0, le=64, description="A fact (an answer sentence) asked by fewer training questions than this gets "
        "framed copies of them (\"Quick question: ...\", \"请问，...\") until it has this many, so a fact the "
        "dataset asks once is trained about as often as one it asks six times (passage and replay rows are left "
        "as they are); the steps grow with the rows. 0: off until bench/knowledge.py shows a gain on both corpora.",
    )
    question_dropout: float | None = Field(
        None, ge=0, le=0.5, description="Share of a training question's words (a Chinese character counts as one) "
        "left out, drawn anew for every row in every epoch with the seed: the reply then hangs on the question's "
        "words together rather than on one exact wording, as a paraphrased question keeps only some of them. The "
        "answer is never touched. 0: off; None: by the base model's size, 0.15 under a billion parameters "
        "(measured on SmolLM2-135M, bench/README.md), else 0 (not measured on larger models here).",
    )
    question_insertion: float = Field(
        0.0, ge=0, le=0.5, description="Chance that a word drawn from the training questions (of the same script; a "
        "Chinese character counts as one) is put in before each word of a training question, drawn anew for every "
        "row in every epoch with the seed, after question_dropout: a paraphrased question brings words the training "
        "questions of its fact never held, some of them other facts' words, and the reply should hang on the words "
        "it shares with them. The answer is never touched. 0: off until bench/knowledge.py shows a gain on both "
        "corpora.",
    )
    seed: int = Field(0, description="Seed for LoRA init, data order, dropout, NEFTune noise, question_dropout and "
                      "question_insertion.")
    method: Literal["auto", "qlora", "lora", "full"] = Field(
        "auto", description="auto: QLoRA (4-bit NF4 base) on CUDA, LoRA on CPU. full: every weight trains (AdamW over "
        "fp32 weights, bf16 autocast where it is faster), and the run folder holds model/ (a whole model) instead of "
        "adapter/; it needs ~16 bytes of memory per parameter, so it is refused above a billion parameters. On "
        "SmolLM2-135M it answered more paraphrased questions than the rank-16 adapter (bench/README.md).",
    )
    cpu_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="CPU compute dtype; auto: bf16 only if the CPU has bf16 units and a timed probe says faster."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, else CPU.")
    init_adapter: str | None = Field(
        None,
        description="A LoRA adapter folder to continue from instead of fresh LoRA weights (the nightly flow's "
        "init_from: promoted puts the promoted model's adapter here); its rank and target modules are used. With "
        "method full: the model/ folder of a finished full run, whose weights training starts from.",
    )
    merge: bool = Field(False, description="Also write merged/: the adapter folded into a full model.")
    logging_steps: int = Field(5, ge=1, description="Log the loss every this many steps.")
    eval_every_steps: int = Field(
        0, ge=0,
        description="Every N steps, answer the dataset's validation questions greedily and score fact recall "
        "(held-out paraphrases: does the model know the facts, not just the training wording?); 0: never.",
    )
    eval_max_questions: int = Field(48, ge=1, description="Validation questions scored at each evaluation.")
    select_checkpoint: Literal["last", "best"] = Field(
        "last",
        description="last: the adapter after the final step; best: the evaluated step with the highest validation "
        "fact recall (the later step on a tie): small models over-trained on a few facts drift into answering with "
        "the same memorised sentences, so the last step is often not the best.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "TrainSettings":
        if self.select_checkpoint == "best" and not self.eval_every_steps:
            raise ValueError("select_checkpoint='best' needs eval_every_steps > 0 (how often to score validation)")
        if self.max_steps == 0 and not self.num_epochs:
            raise ValueError("max_steps is 0 and num_epochs is unset; set max_steps > 0 or num_epochs > 0")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules is an empty list; use 'all-linear' or name the modules")
        return self


# The rate, the noise and question_dropout a base model gets when the settings leave them unset (None), by its
# parameter count.
SMALL_MODEL = 1_000_000_000
BY_SIZE = {"small": {"learning_rate": 1e-3, "neftune_alpha": 15.0, "question_dropout": 0.15},
           "large": {"learning_rate": 2e-4, "neftune_alpha": 0.0, "question_dropout": 0.0}}
# Every weight trains with method full, so a tenth of the adapter's rate: SmolLM2-135M learnt both bench corpora
# at 1e-4 (bench/README.md). Models above SMALL_MODEL are refused by full fine-tuning.
FULL_LEARNING_RATE = 1e-4


def for_base_model(settings: TrainSettings, parameters: int | None) -> tuple[TrainSettings, str]:
    """`settings` with an unset learning_rate, neftune_alpha and question_dropout filled in for a base model of
    `parameters` parameters (None: not known, treated as large), and a line saying what was chosen and why. Set
    values stay."""
    by_size = dict(BY_SIZE["small" if parameters is not None and parameters < SMALL_MODEL else "large"])
    if settings.method == "full":
        by_size["learning_rate"] = FULL_LEARNING_RATE
    unset = {k: v for k, v in by_size.items() if getattr(settings, k) is None}
    if not unset:
        return settings, ""
    size = f"{parameters / 1e6:,.0f}M parameters" if parameters is not None else "an unknown parameter count"
    chosen = ", ".join(f"{k} {v:g}" for k, v in unset.items())
    how = ", trained in full" if settings.method == "full" else ""
    return settings.model_copy(update=unset), f"{chosen} for a base model of {size}{how} (unset in the settings)"


def check_full_fits(settings: TrainSettings, parameters: int | None, base: str) -> None:
    """method full trains every weight: fp32 weights, gradients and two AdamW states, ~16 bytes per parameter.
    Refused above SMALL_MODEL parameters, where an adapter (LoRA, or QLoRA on a GPU) is the way."""
    if settings.method != "full":
        return
    if parameters is None:
        logging.getLogger(__name__).warning("method full: the parameter count of %s is unknown; a full "
                                            "fine-tune needs about 16 bytes of memory per parameter", base)
    elif parameters > SMALL_MODEL:
        raise ValueError(f"method full: {base} has {parameters / 1e9:.1f}B parameters; a full fine-tune needs about "
                         f"{parameters * 16 / 2**30:.0f} GiB for weights, gradients and optimizer states and is "
                         f"offered up to {SMALL_MODEL / 1e9:.0f}B; set method: auto (LoRA, or QLoRA on a GPU)")


# ------------------------------------------------------------------------------------------- evaluate

MetricName = Literal["fact_recall", "rouge_l", "chrf", "judge"]


class EvalSettings(BaseModel):
    # A misspelt key must fail loudly instead of silently keeping the default.
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(64, ge=1, le=4096, description="Longest reply generated per question (greedy).")
    batch_size: int = Field(8, ge=1, le=256, description="Questions generated together in one left-padded batch.")
    max_test_examples: int = Field(
        50, ge=0,
        description="Held-out test-split questions to evaluate (the first N of the seeded split); 0 skips them.",
    )
    system_prompt: str | None = Field(
        None, description="System prompt for gold questions; None uses the one the dataset was built with."
    )
    judge: bool = Field(False, description="Also score replies 1-5 with an LLM judge (costs one call per reply).")
    judge_llm: LLMSettings = Field(default_factory=LLMSettings, description="Endpoint of the LLM judge.")
    promotion_margin: float = Field(
        0.05, ge=0, le=1, description="How much the candidate must beat the model it is compared with by: the lower "
        "end of the 95% interval of the paired gain, on the gold set or, without gold, on the exam."
    )
    promotion_metric: MetricName = Field(
        "fact_recall", description="Metric that decides promotion, on the gold set or, without gold, on the exam.")
    forgetting_check: bool = Field(
        True, description="Base and candidate answer a few shipped general prompts (prompts/general_check.yaml, "
        "English and Chinese); a candidate whose loss on the base's own answers rose too much is not promoted.")
    forgetting_tolerance: float = Field(
        1.0, ge=0, description="Most the candidate's mean loss (nats per token) on the base model's answers to the "
        "general prompts may rise above the base's own before the candidate counts as having forgotten them.")
    noninferiority_tolerance: float = Field(
        0.05, ge=0, le=1, description="On questions about documents the current model was trained on, the candidate "
        "may score at most this much below it (the lower end of the 95% interval of the paired difference).")

    @model_validator(mode="after")
    def _judge_metric_needs_judge(self) -> "EvalSettings":
        if self.promotion_metric == "judge" and not self.judge:
            raise ValueError("promotion_metric='judge' needs judge=true (or pick fact_recall, rouge_l or chrf)")
        return self


# ------------------------------------------------------------------------------------------- export

GGUFType = Literal["F16", "Q8_0", "Q5_0", "Q4_0"]


class ExportSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gguf_types: list[GGUFType] = Field(
        ["F16", "Q8_0"],
        description="GGUF files to write. F16: lossless for a bf16/fp16 model; Q8_0: half the size, small drift; "
        "Q5_0/Q4_0: smaller again, the embedding kept at Q8_0 (small models lose most there).",
    )
    modelfile: bool = Field(True, description="Write an Ollama Modelfile beside the GGUF files.")
    check: Literal["auto", "required", "off"] = Field(
        "auto",
        description="Answer the check questions with llama.cpp on every GGUF file and compare with the merged model. "
        "auto: when node and node-llama-cpp are installed; required: fail without them; off: skip.",
    )
    check_questions: str | None = Field(
        None,
        description="Questions for the check: a JSONL file (a `question` key per line) or a folder of them, such as "
        "the document folder's gold/; missing or None: the run's own test split.",
    )
    check_max_questions: int = Field(30, ge=1, description="At most this many check questions.")
    check_max_tokens: int = Field(48, ge=1, le=1024, description="Greedy tokens per answer in the check.")
    temperature: float = Field(0.2, ge=0, le=2, description="Modelfile sampling temperature (Ollama's default is 0.8).")
    top_p: float = Field(0.9, gt=0, le=1, description="Modelfile nucleus sampling.")
    num_ctx: int = Field(2048, ge=128, description="Modelfile context window (Ollama's num_ctx).")


# ----------------------------------------------------------------------------- the settings-file validator

_CONSTRAINT_WORDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


# A key's value is never repeated: these names would hold the key itself.
_KEY_FIELDS = {"api_key", "apikey", "key", "token", "secret", "password", "openai_api_key", "authorization"}


def _model_at(cls: type[BaseModel], path: list) -> type[BaseModel] | None:
    """The settings model that holds the field at `path` inside `cls` (None where the path leaves models)."""
    model = cls
    for part in path:
        field = model.model_fields.get(str(part)) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        model = field.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unknown_key(error: dict, cls: type[BaseModel] | None) -> str:
    """An unknown nested key, with the closest known one, without repeating its value; a pasted API key
    points to where a key belongs."""
    loc = [str(p) for p in error["loc"]]
    key, name = ".".join(loc), loc[-1]
    holder = _model_at(cls, loc[:-1]) if cls is not None else None
    if name.lower() in _KEY_FIELDS and holder is not None and "api_key_env" in holder.model_fields:
        where = ".".join(loc[:-1])
        return (f"{key} is refused: an API key is never written into settings (they are stored and shown as flow "
                f"parameters). Revoke the key if the file was shared, put it in an environment variable and name "
                f"that variable in {where}.api_key_env, or store it in a Prefect Secret block and name the block in "
                f"{where}.api_key_secret_block")
    known = list(holder.model_fields) if holder is not None else []
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else (f"known keys there: {', '.join(known)}" if known else
                                                        "remove it")
    return f"unknown key {key!r}; {hint}"


def _explain(error: dict, cls: type[BaseModel] | None = None) -> str:
    """One pydantic error as '<key> must be > 0 (got -1)'."""
    key = ".".join(str(p) for p in error["loc"]) or "settings"
    ctx, got = error.get("ctx") or {}, error.get("input")
    if error["type"] == "extra_forbidden":
        return _unknown_key(error, cls)
    if error["loc"] and str(error["loc"][-1]).lower() in _KEY_FIELDS:
        got = "…"
    for kind, word in _CONSTRAINT_WORDS.items():
        if error["type"] == kind:
            bound = next(iter(ctx.values()))
            return f"{key} must be {word} {bound} (got {got!r})"
    if error["type"] == "literal_error":
        return f"{key} must be one of {ctx.get('expected')} (got {got!r})"
    if error["type"] == "value_error":  # our own cross-field checks already say what to do
        return str(ctx.get("error", error["msg"]))
    return f"{key}: {error['msg']} (got {got!r})"


def validate_settings(data: dict, cls: type[M], source: str = "settings") -> M:
    """Validate a plain mapping against a settings model; an unknown key (with the closest known one) or a
    bad value raises ValueError naming the source, the key and the fix."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    known = list(cls.model_fields)
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
            raise ValueError(f"{source}: unknown key {key!r}; {hint}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"{source}: " + "; ".join(_explain(e, cls) for e in exc.errors())) from None


def read_settings_yaml(path: str | Path) -> dict:
    """The mapping in a settings YAML file (an empty file: {}); a missing file, a syntax error or a file
    that is not a mapping raises ValueError in one line naming the file, the line and the fix."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such settings file (working directory {Path.cwd()}); check the path") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: a folder, not a settings file; name the YAML file in it") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ValueError(f"{path}{where}: not valid YAML ({what}); write one `key: value` per line, nested keys "
                         "indented by two spaces") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected `key: value` lines (a mapping of settings), found a "
                         f"{type(data).__name__}")
    return data


def load_settings_file(path: str | Path, cls: type[M]) -> M:
    """A YAML file of `cls` fields, validated before anything expensive starts (an empty file: defaults)."""
    return validate_settings(read_settings_yaml(path), cls, source=str(path))


def validate_train_settings(data: dict, source: str = "settings") -> TrainSettings:
    return validate_settings(data, TrainSettings, source)


def load_train_settings(path: str | Path) -> TrainSettings:
    return load_settings_file(path, TrainSettings)
