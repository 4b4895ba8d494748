"""vlnflow.export: a training run's ZeRO checkpoint -> a directory others can load.

    names.py            training-module parameter names <-> the names on disk (Qwen's own layout)
    consolidate.py      DeepSpeed's zero-to-fp32 consolidation + the frozen weights of the base model
    shards.py           sharded safetensors + model.safetensors.index.json (vlnflow.model.model_dir reads them)
    layout_hf.py        config.json for transformers 5 (Qwen2.5-VL + vlnflow's settings)
    layout_janusvln.py  JanusVLN's flat config and its `vggt.aggregator.*` weights
    export.py           export_run(): one run step -> one complete directory (partial dir, then rename)
    cli.py              `vlnflow export RUN_DIR OUT`
"""
