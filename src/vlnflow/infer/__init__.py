"""vlnflow.infer: ask an exported model for answers.

    generate.py  greedy decoding on a JanusModel with a KV cache (mRoPE positions continued)
    predict.py   `vlnflow predict`: export + samples -> per-sample answer, label, action accuracy
"""
