"""Supervised LoRA / QLoRA fine-tuning as a library; `tasks/train.py` is the recipe that composes it.

    data        chat-template rendering with reply-only labels; the dataset's train/validation splits
    batching    the seeded micro-batch schedule, even packing, collate
    model       the trainable model: device and precision plan, LoRA / NF4 loading, the micro-step loss
    checkpoint  atomic, fsynced checkpoints and resuming from the last complete one
    merge       the adapter folded into the base (training's merge check and export share it)
    report      peak memory, the loss plot and its markdown

No imports here: importing one module must not load the others (and the cache-key scanner reads
each module's own absolute imports).
"""
