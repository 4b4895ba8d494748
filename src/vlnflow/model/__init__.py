"""vlnflow.model: the JanusVLN-style model composed on transformers' Qwen2.5-VL.

    loading.py         build_model / load_processors / resolve_model_config from the `model:` config
    model_dir.py       read an export or a JanusVLN checkpoint (model.init_from, predict), shards checked first
    janus.py           JanusModel: Qwen image tokens + lam * merger(spatial), mRoPE positions, label-only loss
    spatial_merger.py  SpatialMerger: RMSNorm + MLP over 2x2-merged VGGT tokens (JanusVLN layout)
    batching.py        Collator: rows + spatial features -> one packed batch (no padding)
    chat.py            row -> ChatML prompt/answer -> token ids with the prompt masked
    frames.py          frame -> Qwen's image: the VGGT image (crop or pad) cut to whole merge blocks
    vision_fast.py     V1 varlen vision attention, V2 vision MLP padded to x64 (same function)
    packed_attention.py  causal varlen LLM attention over per-sample boundaries
    varlen.py          the segment attention both use (flash on CUDA, exact SDPA elsewhere)
    tiny.py            code-built tiny Qwen2.5-VL, tokenizer, image processor; the 7B's config
"""
