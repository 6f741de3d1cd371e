"""End to end on the embedded SmolLM2 and real MedQuAD data: 2 clients, 1 round, small budgets."""

from __future__ import annotations

import json

import pytest
import torch

from fedpit.cli import main

pytestmark = pytest.mark.smollm2


def test_fedpit_on_medquad_with_smollm2(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    overrides = [
        "model.max_length=256", "data.max_response_tokens=48",
        "data.fewshot.total=16", "data.fewshot.num_clusters=4", "data.fewshot.pool_size=300",
        "data.partition.kind='iid'", "data.partition.num_clients=2", "data.partition.min_examples=4",
        "federation.rounds=1", "synth.num_candidates=3", "synth.max_instructions=6", "synth.batch_size=6",
        "synth.num_response_demos=2", "synth.max_new_tokens_instruction=24", "synth.max_new_tokens_response=40",
        "method.keep=2", "eval.sets=['medquad']", "eval.num_examples=4", "eval.max_new_tokens=24",
        "eval.final_sets=['medquad','pubmedqa']", "eval.final_num_examples=6",
    ]
    argv = ["run", "configs/demo.toml", *[a for o in overrides for a in ("--set", o)], "--quiet", "--out", str(out)]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval" and r["stage"] == "round"]
    assert [e["round"] for e in evals] == [0, 1]
    final = next(r for r in records if r["kind"] == "eval" and r["stage"] == "final")["results"]
    assert final["medquad"]["n"] == 6 and 0.0 <= final["pubmedqa"]["accuracy"] <= 1.0
    kept = [json.loads(line) for line in (out / "eval" / "final" / "pubmedqa.jsonl").read_text().splitlines()]
    assert len(kept) == 6 and all(r["answer"] and r["decision"] in ("yes", "no", "maybe") for r in kept)
    assert all(0.0 <= e["results"]["medquad"]["rougeL"] <= 1.0 for e in evals)
    assert evals[0]["results"]["medquad"]["nll"] != evals[1]["results"]["medquad"]["nll"]
    round_record = next(r for r in records if r["kind"] == "round")
    assert len(round_record["clients"]) == 2
    for metrics in round_record["clients"].values():
        assert metrics["synthetic_generated"] > 0 and metrics["train_loss_private"] > 0
    assert (out / "report.md").is_file()

    # The final adapter is a standard PEFT adapter: it loads onto the base model with peft alone.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedpit.model import resolve_model_path

    base_path = resolve_model_path("smollm2-135m-instruct")
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, str(out / "adapter"))
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    ids = tokenizer("What are the symptoms of anemia?", return_tensors="pt")
    with torch.no_grad():
        tuned_logits = tuned(**ids).logits
        with tuned.disable_adapter():
            base_logits = tuned(**ids).logits
    assert not torch.allclose(tuned_logits, base_logits)
