"""Evaluation: validation metrics, the GPT-2 paper's zero-shot suite through
lm-evaluation-harness, Hugging Face interop and the model card.

    handgrad.eval.validate.validation_metrics(checkpoint, data)    # = the trainer's val loss
    handgrad.eval.zero_shot.run_zero_shot(suite="gpt2-paper", checkpoint=...)   # needs lm-eval
    handgrad.eval.hf.export_hf(checkpoint, out) / import_hf(hf_dir, out)
    handgrad.eval.report.write_report(checkpoint, "MODEL_CARD.md", zero_shot="results.json")

Only ``lm_eval_model`` and ``zero_shot`` use lm-eval (the optional extra ``handgrad[eval]``),
imported when they run; nothing here imports torch.
"""
