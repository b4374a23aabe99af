"""The attention modes: one vocabulary for the config (`eval.modes`), the eval suite and the attention switch
(`infllm.attention.attention_mode`).

- "dense": every document attends densely (the kernels' dense path);
- "sparse": every document attends sparsely, whatever its length (the kernels' `dense_len = -1`);
- "model": as the model is configured: InfLLM-V2 switches per document by `attention.dense_len` (dense below
  it, sparse from it), a dense model stays dense, InfLLM (v1) uses its context memory.
"""
ATTENTION_MODES = ("dense", "sparse", "model")
