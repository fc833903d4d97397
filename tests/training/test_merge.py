"""The one merge (training's merge check and export use it): base + adapter folded into a full model
in the base's own dtype, saved with the tokenizer and its chat template. The merge check on a trained
run: tests/test_train.py; export: tests/test_export.py."""

from __future__ import annotations

import torch

from doctune.training.merge import load_with_adapter, merge_adapter


def test_merge_adapter_keeps_the_base_dtype_and_the_chat_template(tiny_model, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "base-bf16"  # a bf16 checkpoint must stay bf16 ("auto"), not become fp32
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(base)
    tokenizer.save_pretrained(base)
    torch.manual_seed(0)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype="auto"),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():  # B starts at zero: a merge of that would change nothing
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    lora.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")

    out = merge_adapter(str(base), tmp_path / "adapter", tmp_path / "merged")

    assert out == tmp_path / "merged" and not (tmp_path / ".tmp-merged").exists()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(out).chat_template
    ids = torch.tensor([tokenizer("The price of item 3 is", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        want = load_with_adapter(str(base), tmp_path / "adapter")(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base, dtype="auto")(ids).logits
        got = merged(ids).logits
    assert not torch.allclose(want, plain)  # the adapter changes the model ...
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.05)  # ... and the merge carries it (bf16 rounding)
