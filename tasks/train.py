"""Supervised fine-tuning of the base model on the chat dataset: LoRA on CPU, QLoRA on CUDA, or (method full) every
weight of a model under a billion parameters.

The loop is written out (no `Trainer`) so that what it does is visible on one screen and a
crash can resume exactly: micro-batches come from a schedule fixed by the seed, so a checkpoint
only has to remember how far along it was. Loss is on the assistant's reply tokens only.

Batching defaults to padding-free packing (several conversations per row, kept apart by position
ids). Measured on this 2-core CPU with SmolLM2-135M, batch 8: 1.6-1.9x the non-pad tokens/s of a
plain Trainer with padding (bench/train_throughput.py), and the same cost per token as ideally
length-grouped batches, without grouping's same-length batches.

    settings = load_train_settings("configs/train.yaml")   # doctune.model_settings; validated first
    run_dir = train("outputs/datasets/<id>", settings, "outputs")

The pieces are in doctune/training/ (data, batching, model, checkpoint, merge, report); this module is
the recipe that composes them. Run folder layout: the docstring of doctune/runs.py.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml
from prefect import task
from tqdm.auto import tqdm

from doctune.generation import chat_prompts, generate_greedy
from doctune.metrics import fact_recall, rouge_l
from doctune.model_settings import TrainSettings, check_full_fits, for_base_model
from doctune.prefect_utils import CACHE
from doctune.runs import dataset_hash, dataset_system_prompt, run_dir_for, settings_hash, write_json
from doctune.training.batching import collate, micro_batch_stream, to_device, total_steps
from doctune.training.checkpoint import load_checkpoint, resume_checkpoint, save_checkpoint, save_weights, weights_name
from doctune.training.data import (IGNORE, QuestionDropout, load_train_split, load_validation, render_split,
                                   text_rows_for, tokenize_texts, unwritten_languages, with_system)
from doctune.training.length import duration, expected_training
from doctune.training.merge import merge_and_check
from doctune.training.model import (
    Plan, autocast_for, initial_plan, load_model, load_tokenizer, make_optimizer, micro_step_loss, parameter_count,
    probe_cpu_dtype, set_4bit_compute, store_frozen_in_compute_dtype,
)
from doctune.training.report import loss_markdown, peak_memory, plot_loss

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- one step


def optimizer_step(model, batches: list[dict], plan: Plan, optimizer, scheduler, max_grad_norm: float):
    """One step over `batches` (the accumulated micro-batches); returns (loss, reply tokens)."""
    # Normalise by the reply tokens of the whole step, so every token weighs the same however
    # the accumulation split falls (mean-of-means would favour short micro-batches).
    n_labels = sum(int((b["labels"] != IGNORE).sum()) for b in batches)
    step_loss = 0.0
    for b in batches:
        loss = micro_step_loss(model, b, plan) / max(n_labels, 1)
        loss.backward()
        step_loss += loss.item()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, n_labels


# ----------------------------------------------------------------------------- validation


def score_validation(model, tokenizer, items: list[dict], settings: TrainSettings, plan: Plan) -> dict:
    """Greedy replies to the validation questions, scored; the model is put back in training mode."""
    systems = [settings.system_prompt if settings.system_prompt is not None else i["system"] for i in items]
    model.eval()
    try:
        replies = generate_greedy(model, tokenizer, chat_prompts(tokenizer, [i["question"] for i in items], systems),
                                  max_new_tokens=64, batch_size=16, autocast=autocast_for(plan))
    finally:
        model.train()
    with_facts = [(r, i) for r, i in zip(replies, items) if i["facts"]]
    recall = sum(fact_recall(r, i["facts"]) for r, i in with_facts) / len(with_facts) if with_facts else 0.0
    rouge = sum(rouge_l(r, i["answer"]) for r, i in zip(replies, items)) / len(items)
    return {"fact_recall": round(recall, 4), "rouge_l": round(rouge, 4), "questions": len(items),
            "with_facts": len(with_facts), "example": {"question": items[0]["question"], "reply": replies[0]}}


def validate_step(run_dir: Path, model, tokenizer, items: list[dict], settings: TrainSettings, plan: Plan,
                  state: dict) -> None:
    """Score the validation questions now; keep the weights aside when they are the best so far."""
    result = {"step": state["step"], **score_validation(model, tokenizer, items, settings, plan)}
    example = result.pop("example")
    state["evals"].append(result)
    best = best_eval(state["evals"])
    if best is result and settings.select_checkpoint == "best":
        save_weights(run_dir, model, tokenizer, name="best")
    log.info("step %d: validation fact recall %.3f, ROUGE-L %.3f (%d questions)%s; e.g. %r -> %r",
             state["step"], result["fact_recall"], result["rouge_l"], result["questions"],
             " - best so far" if best is result else f" - best is step {best['step']}",
             example["question"], example["reply"][:120])


def best_eval(evals: list[dict]) -> dict | None:
    """The evaluated step with the highest validation fact recall. Ties go to the later step: it has
    seen more of the data, and a small validation set ties often."""
    return max(evals, key=lambda e: (e["fact_recall"], e["step"]), default=None)


# ----------------------------------------------------------------------------- around the loop


def settle_precision(model, plan: Plan, settings: TrainSettings, base: str, last: Path | None, tokenizer,
                     examples: list) -> Plan:
    """The compute dtype: a resumed run's own, else the CPU probe's choice when cpu_dtype is auto;
    then the frozen weights stored in it where that saves casts."""
    if last is not None:
        # Finish with the dtype the run started with, whatever a new probe would say now.
        saved = json.loads((last / "state.json").read_text())["plan"]
        plan.compute, plan.probe = saved["compute"], saved["probe"]
        if plan.method == "qlora":
            set_4bit_compute(model, torch.bfloat16 if plan.compute == "bf16" else torch.float32)
    elif plan.device == "cpu" and settings.cpu_dtype == "auto":
        first = to_device(collate(next(micro_batch_stream(examples, settings, 0)), settings.batching,
                                  tokenizer.pad_token_id, settings.max_seq_len), plan.device)
        key = (base, plan.method, tuple(first["input_ids"].shape), settings.gradient_checkpointing, settings.lora_r,
               settings.fast_lora_dropout)
        plan = probe_cpu_dtype(model, first, plan, key)
    log.info(plan.describe())
    cast = store_frozen_in_compute_dtype(model, plan)
    if cast:
        log.info("frozen base weights stored in bf16 (%d Linear layers): autocast no longer casts them in "
                 "every forward", cast)
    return plan


def keep_weights(run_dir: Path, model, tokenizer, settings: TrainSettings, state: dict) -> None:
    """adapter/ (model/ for a full fine-tune): the best validated step's (select_checkpoint best) or the last
    step's; notes which in state."""
    folder = weights_name(model)
    if settings.select_checkpoint == "best":
        # The last step is always evaluated, so best/ holds the best weights, the last step's included.
        best = best_eval(state["evals"])
        shutil.rmtree(run_dir / folder, ignore_errors=True)
        (run_dir / "best").rename(run_dir / folder)
        state["selected_step"] = best["step"]
        if best["step"] != state["step"]:
            log.info("selected the %s of step %d (validation fact recall %.3f) over the last step %d", folder,
                     best["step"], best["fact_recall"], state["step"])
    else:
        save_weights(run_dir, model, tokenizer)
        state["selected_step"] = state["step"]


def write_outputs(run_dir: Path, tokenizer, state: dict, plan: Plan, settings: TrainSettings, asked: TrainSettings,
                  base: str, dataset_dir: str | Path, data_counts: dict) -> None:
    """loss.png, metrics.json, merged/ if asked, and run.json last (it marks the run finished). `settings` are
    what trained, `asked` the settings that name the run (unset size-dependent fields left unset)."""
    plot_loss(state["losses"], run_dir / "loss.png", state.get("evals"), state["selected_step"])
    metrics = {
        "steps": state["step"],
        "selected_step": state["selected_step"],
        "validation": state.get("evals", []),
        "eval_seconds": round(state.get("eval_seconds", 0.0), 2),
        **data_counts,
        "losses": state["losses"],
        "train_seconds": round(state["seconds"], 2),
        "tokens": state["tokens"],
        "label_tokens": state["label_tokens"],
        # non-pad tokens per second over the whole run (the resumed part included)
        "tokens_per_s": round(state["tokens"] / max(state["seconds"], 1e-9), 1),
        "s_per_step": round(state["seconds"] / max(state["step"], 1), 3),
        **peak_memory(plan.device),
        "plan": plan.describe(),
        "probe": plan.probe,
    }
    if settings.merge and plan.method == "full":
        log.info("merge: a full fine-tune's model/ is a whole model already; no merged/ written")
    elif settings.merge:
        prompts = [
            tokenizer.apply_chat_template(with_system(m, settings.system_prompt)[:-1], tokenize=False,
                                          add_generation_prompt=True)
            for m in load_train_split(dataset_dir)["messages"][:3]
        ]
        metrics["merge_check"] = merge_and_check(base, run_dir / "adapter", run_dir / "merged", prompts, plan.device)
        if not metrics["merge_check"]["all_identical"]:
            log.warning("merged model differs from base+adapter: %s", metrics["merge_check"])
    write_json(run_dir / "metrics.json", metrics)
    # run.json last: its presence marks the run finished.
    write_json(
        run_dir / "run.json",
        {
            "base_model": base,
            "dataset_dir": str(dataset_dir),
            "dataset_sha256": dataset_hash(dataset_dir),
            "settings_sha256": settings_hash(asked),
            "learning_rate": settings.learning_rate,
            "neftune_alpha": settings.neftune_alpha,
            "question_dropout": settings.question_dropout,
            "question_insertion": settings.question_insertion,
            "init_adapter": settings.init_adapter,
            "method": plan.name,
            "device": plan.device,
            "optimizer": plan.optimizer,
            "probe": plan.probe,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "steps": state["step"],
            "selected_step": state["selected_step"],
            # The system message training used; `doctune serve` gives it to requests that bring none.
            "system_prompt": settings.system_prompt if settings.system_prompt is not None
            else dataset_system_prompt(dataset_dir),
        },
    )


# ----------------------------------------------------------------------------- the loop


class TrainingInterrupted(RuntimeError):
    """Raised by `stop_after_steps` to simulate a crash (tests of resume)."""


def train(
    dataset_dir: str | Path,
    settings: TrainSettings,
    output_root: str | Path,
    resume: bool = False,
    progress: bool = True,
    *,
    stop_after_steps: int | None = None,
) -> Path:
    """Fine-tune and return the run folder. A finished run folder is returned as is; an unfinished
    one is continued from its last checkpoint only with resume=True. `stop_after_steps` raises
    TrainingInterrupted after that many steps of this call (to test resuming)."""
    from transformers import get_scheduler

    run_dir = run_dir_for(dataset_dir, settings, output_root)
    if (run_dir / "run.json").exists():
        log.info("%s is already trained; returning it", run_dir)
        return run_dir
    if run_dir.exists() and not resume:
        raise FileExistsError(
            f"{run_dir} exists from an unfinished run; pass resume=True to continue it "
            f"(or delete the folder to start over)"
        )
    base = settings.base_model
    if not base:
        from doctune.base_model import prepare_base_model

        base = str(prepare_base_model())
    parameters = parameter_count(base)
    check_full_fits(settings, parameters, base)  # before the run folder exists: a refused run leaves none
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "settings.yaml").write_text(yaml.safe_dump(settings.model_dump(), sort_keys=False))

    asked = settings  # names the run; `settings` below is what trains (the size-dependent defaults filled in)
    settings, chosen = for_base_model(settings, parameters)
    if chosen:
        log.info("%s", chosen)
    tokenizer = load_tokenizer(base)
    examples, dropped, kept = render_split(tokenizer, load_train_split(dataset_dir), settings)
    n_qa = len(examples)
    if settings.text_rows or settings.text_rows_unwritten:
        texts = tokenize_texts(tokenizer, text_rows_for(dataset_dir, settings), settings.max_seq_len)
        which = "" if settings.text_rows else f" in {', '.join(sorted(unwritten_languages(dataset_dir))) or 'no language'}"
        log.info("text-completion rows: %d examples of the documents' own text%s, mixed with %d question/answer rows",
                 len(texts), which, len(examples))
        if not texts and settings.text_rows:
            log.warning("%s has no text-completion rows (built with dataset.text_rows off?): training on the "
                        "question/answer rows only", dataset_dir)
        examples += texts
    steps = total_steps(settings, len(examples))
    accum = settings.gradient_accumulation_steps
    if not (run_dir / "checkpoints").exists():  # said once, before the model loads
        expected = expected_training(dataset_dir, settings, output_root, rows=(n_qa, len(examples) - n_qa))
        log.info("training %s", expected.text(settings))

    plan = initial_plan(settings)
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    model = load_model(base, plan, settings)
    model.train()
    last = resume_checkpoint(run_dir) if resume else None
    plan = settle_precision(model, plan, settings, base, last, tokenizer, examples)
    if settings.neftune_alpha:
        log.info("NEFTune: uniform noise (alpha %g) on the input embeddings while training", settings.neftune_alpha)

    optimizer = make_optimizer(model, plan, settings)
    scheduler = get_scheduler(
        settings.lr_scheduler, optimizer,
        num_warmup_steps=math.ceil(settings.warmup_ratio * steps), num_training_steps=steps,
    )
    state = {"step": 0, "micro_batches": 0, "losses": [], "tokens": 0, "label_tokens": 0, "seconds": 0.0,
             "plan": {"compute": plan.compute, "probe": plan.probe}}
    if last is not None:
        state = load_checkpoint(last, model, optimizer, scheduler)
        log.info("resuming %s from %s", run_dir, last.name)
    state.setdefault("evals", [])
    validation = load_validation(dataset_dir, settings.eval_max_questions) if settings.eval_every_steps else []
    if settings.eval_every_steps and not validation:
        if settings.select_checkpoint == "best":
            raise ValueError(f"{dataset_dir} has no validation split to choose the best checkpoint by; rebuild it "
                             f"with dataset.validation_size > 0, or set select_checkpoint: last")
        log.warning("%s has no validation split: eval_every_steps is ignored", dataset_dir)
    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    varied = None
    if settings.question_dropout:
        log.info("question_dropout %g: each epoch drops its own share of every training question's words",
                 settings.question_dropout)
    if settings.question_insertion:
        log.info("question_insertion %g: each epoch puts other training questions' words into every training "
                 "question", settings.question_insertion)
    if settings.question_dropout or settings.question_insertion:
        varied = QuestionDropout(tokenizer, kept, examples, settings)
    stream = micro_batch_stream(examples, settings, state["micro_batches"], varied)
    bar = tqdm(total=steps, initial=state["step"], disable=not progress, desc="train", unit="step")
    start_step, t0 = state["step"], time.perf_counter()
    t_wall = t0  # validation included: the estimate is of the wait, not of training alone
    while state["step"] < steps:
        batches = [
            to_device(collate(next(stream), settings.batching, tokenizer.pad_token_id, settings.max_seq_len),
                      plan.device)
            for _ in range(accum)
        ]
        step_loss, n_labels = optimizer_step(model, batches, plan, optimizer, scheduler, settings.max_grad_norm)
        state["step"] += 1
        state["micro_batches"] += accum
        state["tokens"] += sum(int(b["n_tokens"]) for b in batches)
        state["label_tokens"] += n_labels
        state["losses"].append({"step": state["step"], "loss": round(step_loss, 5), "lr": scheduler.get_last_lr()[0]})
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}")
        if state["step"] == start_step + 1 and steps > state["step"]:  # the expected time, as training starts
            took = time.perf_counter() - t_wall
            log.info("step %d/%d took %.1f s: training should take about %s (the first step is the slowest)",
                     state["step"], steps, took, duration(took * (steps - start_step)))
        if state["step"] % settings.logging_steps == 0 or state["step"] == steps:
            done = state["step"] - start_step
            left = (time.perf_counter() - t_wall) / done * (steps - state["step"])
            log.info("step %d/%d loss %.4f, about %s left", state["step"], steps, step_loss, duration(left))
        if validation and (state["step"] % settings.eval_every_steps == 0 or state["step"] == steps):
            state["seconds"] += time.perf_counter() - t0  # training time excludes validation
            t_eval = time.perf_counter()
            validate_step(run_dir, model, tokenizer, validation, settings, plan, state)
            state["eval_seconds"] = state.get("eval_seconds", 0.0) + time.perf_counter() - t_eval
            t0 = time.perf_counter()
        if settings.save_every_steps and state["step"] % settings.save_every_steps == 0 and state["step"] < steps:
            state["seconds"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            epoch, pos = divmod(state["micro_batches"], math.ceil(len(examples) / settings.per_device_batch_size))
            state["data_position"] = {"epoch": epoch, "micro_batch_in_epoch": pos}
            save_checkpoint(run_dir, model, optimizer, scheduler, state)
        if stop_after_steps is not None and state["step"] - start_step >= stop_after_steps and state["step"] < steps:
            bar.close()
            raise TrainingInterrupted(f"stopped after step {state['step']} (stop_after_steps={stop_after_steps})")
    bar.close()
    state["seconds"] += time.perf_counter() - t0

    keep_weights(run_dir, model, tokenizer, settings, state)
    del model, optimizer, scheduler  # free the training copy before a merge loads an unquantized one
    write_outputs(run_dir, tokenizer, state, plan, settings, asked, base, dataset_dir,
                  {"examples": len(examples), "dropped": dropped})
    if plan.method == "full" and (run_dir / "checkpoints").exists():
        # A finished run is never resumed, and a full fine-tune's checkpoint is the whole model plus two optimizer
        # states (~1.6 GB for SmolLM2-135M): a nightly would otherwise leave two of them behind every night.
        freed = sum(f.stat().st_size for f in (run_dir / "checkpoints").rglob("*") if f.is_file())
        shutil.rmtree(run_dir / "checkpoints")
        log.info("removed %s/checkpoints (%.1f GB): the run is finished", run_dir, freed / 1e9)
    log.info("trained %s in %.0f s: final loss %.4f", run_dir, state["seconds"], state["losses"][-1]["loss"])
    return run_dir


# ----------------------------------------------------------------------------- Prefect


@task(cache_policy=CACHE, persist_result=True, retries=1)
def train_task(
    dataset_dir: str, dataset_fingerprint: str, settings: TrainSettings, output_root: str, resume: bool = True
) -> str:
    """Train (or return the finished run). `dataset_fingerprint` is the dataset's content hash, so
    the cache misses when the data changes; a retry resumes from the last checkpoint."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import TaskRunContext

    run_dir = train(dataset_dir, settings, output_root, resume=resume)
    if TaskRunContext.get() is not None:
        from prefect import get_run_logger

        metrics = json.loads((run_dir / "metrics.json").read_text())
        get_run_logger().info("%s; %s tokens/s; run folder %s", metrics["plan"], metrics["tokens_per_s"], run_dir)
        create_markdown_artifact(
            key="train-loss", markdown=loss_markdown(run_dir), description=f"training loss of {run_dir.name}"
        )
    return str(run_dir)
