"""Training data: conversations rendered through the model's own chat template, with labels on the
assistant's reply only, and the dataset folder's train and validation splits (its hf/ folder, as the
build_dataset flow writes it)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from doctune.metrics import answer_facts
from doctune.model_settings import TrainSettings
from doctune.records import NOT_ONE_FACT, fact_key

log = logging.getLogger(__name__)

IGNORE = -100  # label value cross-entropy skips


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE everywhere but the reply and its end-of-turn token


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """The conversation (role and content only) with `system_prompt`, when given, as its system message."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if system_prompt is None:
        return messages
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": system_prompt}] + messages[1:]
    return [{"role": "system", "content": system_prompt}] + messages


def _template_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    # transformers 5 returns a BatchEncoding here; older versions a plain list.
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def end_of_turn_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    for name in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return {i for i in ids if i is not None}


def render_example(tokenizer, messages: list[dict], system_prompt: str | None, max_seq_len: int) -> Example | str:
    """Tokenize one conversation through the model's own chat template; a string is a drop reason.

    The prompt is rendered on its own (with the generation prompt) and must be a token prefix of the
    full conversation: everything in that prefix is masked, so the loss sees only the reply."""
    messages = with_system(messages, system_prompt)
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        return "last message is not an assistant reply"
    prompt = _template_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    full = _template_ids(tokenizer, messages)
    if full[: len(prompt)] != prompt:
        return "chat template renders the prompt differently inside the full conversation"
    reply = full[len(prompt):]
    # Cut what the template writes after the end-of-turn token (ChatML's newline): not the reply.
    ends = end_of_turn_ids(tokenizer)
    last_end = max((i for i, t in enumerate(reply) if t in ends), default=None)
    if last_end is not None:
        reply = reply[: last_end + 1]
    if not reply:
        return "empty reply"
    if len(prompt) + len(reply) > max_seq_len:
        return "longer than max_seq_len"
    return Example(prompt + reply, [IGNORE] * len(prompt) + reply)


def load_train_split(dataset_dir: str | Path):
    from datasets import load_from_disk

    hf = Path(dataset_dir) / "hf"
    if not hf.exists():
        raise FileNotFoundError(f"{hf} is missing; build the dataset first (the build_dataset flow writes it)")
    data = load_from_disk(str(hf))
    if "train" not in data:
        raise ValueError(f"{hf}: no 'train' split (found {list(data)})")
    if "messages" not in data["train"].column_names:
        raise ValueError(f"{hf}: the train split has no 'messages' column")
    return data["train"]


def load_validation(dataset_dir: str | Path, limit: int) -> list[dict]:
    """Validation questions with the key facts a correct reply must contain (those the question
    does not already give away). Datasets written before the split existed have none."""
    from datasets import load_from_disk

    data = load_from_disk(str(Path(dataset_dir) / "hf"))
    if "validation" not in data:
        return []
    rows = data["validation"].select(range(min(limit, len(data["validation"]))))
    return [{"question": r["question"], "answer": r["answer"], "system": r["system"],
             "facts": answer_facts(r["question"], r["answer"], r["language"])} for r in rows]


# Frames around a question that leave what it asks as it is: the copies a sparsely asked fact gets.
FRAMES = {
    "en": ("Quick question: {q}", "I'd like to know: {q}", "{q} Please answer in one sentence.",
           "From our company documents: {q}", "Can you help? {q}"),
    "zh": ("请问，{q}", "我想知道：{q}", "{q}请用一句话回答。", "根据公司文件，{q}", "麻烦问一下：{q}"),
}


def _column(rows, name: str, n: int) -> list:
    return list(rows[name]) if name in getattr(rows, "column_names", rows) else [None] * n


def last_user(messages: list[dict]) -> int | None:
    """The index of the conversation's last user message (its question); None when it has none."""
    return max((j for j, m in enumerate(messages) if m["role"] == "user"), default=None)


def with_question(messages: list[dict], rewrite) -> list[dict]:
    """`messages` with the last user message's content put through `rewrite`; a conversation without a user
    message is returned as it is."""
    user = last_user(messages)
    if user is None:
        return messages
    return messages[:user] + [{**messages[user], "content": rewrite(messages[user]["content"])}] + messages[user + 1:]


def balanced(rows, minimum: int, seed: int) -> list[list[dict]]:
    """The rows' conversations, and for every answer asked by fewer than `minimum` questions, framed copies of
    its questions (cycling through them and FRAMES, in a seeded order) until it has `minimum`."""
    import random

    conversations = [list(m) for m in rows["messages"]]
    if not minimum:
        return conversations
    n = len(conversations)
    by_answer: dict[str, list[int]] = {}
    for i, (messages, source) in enumerate(zip(conversations, _column(rows, "source", n))):
        if source in NOT_ONE_FACT or not messages or messages[-1]["role"] != "assistant" or last_user(messages) is None:
            continue
        by_answer.setdefault(fact_key(messages[-1]["content"]), []).append(i)
    rng = random.Random(f"balance-{seed}")
    languages = _column(rows, "language", n)
    extra = []
    for answer, members in by_answer.items():
        frames = list(FRAMES["zh" if languages[members[0]] == "zh" else "en"])
        rng.shuffle(frames)
        for k in range(minimum - len(members)):
            frame = frames[k % len(frames)]
            extra.append(with_question(conversations[members[k % len(members)]], lambda q: frame.format(q=q)))
    return conversations + extra


def split_conversations(rows, settings: TrainSettings) -> list[tuple[list[dict], str | None]]:
    """Each conversation of the split (with `min_rows_per_answer`'s framed copies) and the system prompt it trains
    with; a seeded `no_system_share` of them lose their system message (None then stands for the template's own)."""
    import random

    rng = random.Random(f"no-system-{settings.seed}")
    conversations = balanced(rows, settings.min_rows_per_answer, settings.seed)
    if len(conversations) > len(rows["messages"]):
        log.info("min_rows_per_answer %d: %d framed copies of the questions of sparsely asked facts",
                 settings.min_rows_per_answer, len(conversations) - len(rows["messages"]))
    out = []
    for messages in conversations:
        if settings.no_system_share and rng.random() < settings.no_system_share:
            out.append(([m for m in messages if m["role"] != "system"], None))
        else:
            out.append((messages, settings.system_prompt))
    return out


def render_split(tokenizer, rows, settings: TrainSettings):
    """The rows as examples, the drop reasons counted, and the conversations (with their system prompt) the
    examples were rendered from, in the same order."""
    examples, dropped, kept = [], {}, []
    conversations = split_conversations(rows, settings)
    for messages, system in conversations:
        out = render_example(tokenizer, messages, system, settings.max_seq_len)
        if isinstance(out, str):
            dropped[out] = dropped.get(out, 0) + 1
        else:
            examples.append(out)
            kept.append((messages, system))
    if dropped:
        log.warning("dropped %d of %d training examples: %s", sum(dropped.values()), len(conversations), dropped)
    if not examples:
        raise ValueError(f"no trainable examples left (dropped: {dropped}); check max_seq_len and the chat template")
    return examples, dropped, kept


def tokenize_split(tokenizer, rows, settings: TrainSettings) -> tuple[list[Example], dict[str, int]]:
    """The rows as examples (with `min_rows_per_answer`'s framed copies); a seeded `no_system_share` of them
    without their system message."""
    examples, dropped, _ = render_split(tokenizer, rows, settings)
    return examples, dropped


# A question's units for question_dropout: a CJK character, a run of other non-space characters (an English word
# with what sticks to it), trailing punctuation apart so the question keeps its question mark.
_CJK = "\u3400-\u9fff\uf900-\ufaff"
_UNIT = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_TRAILING = re.compile(r"[?？!！.。,，;；:：\"'”’)）]+$")
_HAS_CJK = re.compile(rf"[{_CJK}]")


def drop_words(question: str, share: float, rng) -> str:
    """`question` with each of its words (a CJK character counts as one) left out with probability `share`;
    punctuation stays, and at least one word does. Spacing is the question's own."""
    units = []  # (text, space before it, droppable)
    last = 0
    for m in _UNIT.finditer(question):
        text, space = m.group(), question[last:m.start()]
        last = m.end()
        tail = _TRAILING.search(text)
        if tail and tail.start() > 0:
            units += [(text[: tail.start()], space, True), (tail.group(), "", False)]
        else:
            units.append((text, space, any(c.isalnum() for c in text)))
    keep = [not droppable or rng.random() >= share for _, _, droppable in units]
    if not any(k and d for k, (_, _, d) in zip(keep, units)):
        return question
    out = "".join(space + text for k, (text, space, _) in zip(keep, units) if k).strip()
    return out[:1].upper() + out[1:]


def question_words(questions: list[str]) -> dict[bool, list[str]]:
    """The words of `questions` for question_insertion, by script: {True: CJK characters of the questions that hold
    any, False: the other questions' words}, each as often as it occurs, in order (a seeded draw is then stable); a
    question's capitalised first word in lower case."""
    pool = {True: [], False: []}
    for q in questions:
        cjk = bool(_HAS_CJK.search(q))
        for n, m in enumerate(_UNIT.finditer(q)):
            word = _TRAILING.sub("", m.group())
            if any(c.isalnum() for c in word) and bool(_HAS_CJK.match(word)) == cjk:
                pool[cjk].append(word.lower() if n == 0 and word.istitle() else word)  # "Where", not a name
    return pool


def insert_words(question: str, share: float, pool: dict[bool, list[str]], rng) -> str:
    """`question` with, before each of its words, a word drawn from the training questions of its script (`pool`,
    mostly other questions' words) put in with probability `share` (a Chinese character counts as one word); the
    words and punctuation it had all stay."""
    cjk = bool(_HAS_CJK.search(question))
    words = pool.get(cjk) or []
    if not share or not words:
        return question
    out, last = [], 0
    for m in _UNIT.finditer(question):
        space, text = question[last:m.start()], m.group()
        last = m.end()
        if any(c.isalnum() for c in text) and rng.random() < share:
            out.append((space or ("" if cjk else " ")) + rng.choice(words))
            space = "" if cjk else " "
        out.append(space + text)
    text = "".join(out).strip()
    return text[:1].upper() + text[1:] if question[:1].isupper() else text


class QuestionDropout:
    """question_dropout and question_insertion: every epoch trains each question/answer row with its own seeded drop
    of the question's words and insertion of other questions' words, so the reply is tied to the question's words
    together rather than to one exact wording (a paraphrase keeps some of them and brings words of its own). The
    answer, the system message and the text rows stay as they are."""

    def __init__(self, tokenizer, kept: list[tuple[list[dict], str | None]], examples: list[Example],
                 settings: TrainSettings):
        """`kept`: the conversations render_split rendered; `examples`: their examples, then the text rows."""
        self.tokenizer, self.kept, self.examples, self.settings = tokenizer, kept, examples, settings
        self._epoch, self._examples = None, None
        self.pool = question_words([m[j]["content"] for m, _ in kept if (j := last_user(m)) is not None]) \
            if settings.question_insertion else {}

    def conversation(self, i: int, epoch: int) -> list[dict]:
        import random

        messages, _ = self.kept[i]
        rng = random.Random(f"question-dropout-{self.settings.seed}-{epoch}-{i}")
        drop, insert = self.settings.question_dropout or 0.0, self.settings.question_insertion

        def vary(q: str) -> str:
            q = drop_words(q, drop, rng) if drop else q
            return insert_words(q, insert, self.pool, rng) if insert else q

        return with_question(messages, vary)

    def __call__(self, epoch: int) -> list[Example]:
        if epoch != self._epoch:
            examples = list(self.examples)
            for i, (_, system) in enumerate(self.kept):
                out = render_example(self.tokenizer, self.conversation(i, epoch), system, self.settings.max_seq_len)
                if not isinstance(out, str):  # else the row as written
                    examples[i] = out
            self._epoch, self._examples = epoch, examples
        return self._examples


def load_text_rows(dataset_dir: str | Path, languages: set[str] | None = None) -> list[str]:
    """The dataset's text-completion rows (text.jsonl: the documents' own text), of `languages` only when given;
    [] for a dataset written without them."""
    import json

    path = Path(dataset_dir) / "text.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["text"] for r in rows if languages is None or r.get("language") in languages]


def unwritten_languages(dataset_dir: str | Path) -> set[str]:
    """The languages the dataset's endpoint wrote no questions in (its build's probe skipped them: the offline
    135M model writes no Chinese), from manifest.json (none without one)."""
    import json

    path = Path(dataset_dir) / "manifest.json"
    if not path.is_file():
        return set()
    manifest = json.loads(path.read_text(encoding="utf-8"))
    return set(manifest.get("counts", {}).get("skipped_languages", []))


def text_rows_for(dataset_dir: str | Path, settings: TrainSettings) -> list[str]:
    """The text rows `settings` trains on: all with text_rows, those of the unwritten languages with
    text_rows_unwritten, else none."""
    if settings.text_rows:
        return load_text_rows(dataset_dir)
    if settings.text_rows_unwritten and (languages := unwritten_languages(dataset_dir)):
        return load_text_rows(dataset_dir, languages)
    return []


def tokenize_texts(tokenizer, texts: list[str], max_seq_len: int) -> list[Example]:
    """Text-completion examples: the text and an end-of-text token, loss on every token (continued
    pretraining), cut into windows of at most `max_seq_len` tokens."""
    examples = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + eos
        for start in range(0, len(ids), max_seq_len):
            window = ids[start:start + max_seq_len]
            if len(window) > 1:
                examples.append(Example(window, list(window)))
    return examples
