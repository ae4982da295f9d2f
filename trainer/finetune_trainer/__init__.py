"""The FineTuneJob trainer: plain functions over a model, one module per concern.

    config.py, rules.py   the API (pydantic only; the operator imports these two)
    uris.py, assets.py    pvc://, hf://, file:// URIs; the bundled local assets (`make assets`)
    data.py, batches.py   datasets in, seeded split, labels; tokenised, padded, bucketed batches
    models.py             transformers Auto classes, torchvision networks, models built from configs
    structure.py          head, layer stack and LoRA candidates, shared by the stages
    analyze.py            stage 1: StructureReport and its findings
    adjust.py             stage 2: freezing, layer-wise learning rates, weight-decay groups
    rearrange.py          stage 3: new head, LoRA/DoRA, checked merge
    train.py              stage 4: the training loop; checkpoints.py, distributed.py beside it
    torchrun.py           torchrun's RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE, read without torch
    evaluate.py           stage 5: baseline and final metrics
    export.py             stage 6: weights, tokenizer, labels, model card, loss curve
    telemetry.py          Prometheus metrics, termination message
    pipeline.py           the stages in order: `run(cfg, output_dir) -> report`
    cli.py                `finetune-trainer run <manifest or config> [--output DIR]`

Environment: FINETUNE_PVC_ROOT (where pvc:// claims are mounted; default the nearest
.data/pvc), FINETUNE_METRICS_PORT / FINETUNE_METRICS_ADDR (default 127.0.0.1:9090, port 0
off), TERMINATION_MESSAGE_PATH, and torchrun's RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE. Exit codes
are in errors.py. Checkpoints live in <output>/checkpoints/<config fingerprint>; a rerun of
the same config on the same output resumes from the newest complete one.
"""
