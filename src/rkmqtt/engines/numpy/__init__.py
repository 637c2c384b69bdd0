"""The numpy CPU engine: a Llama-family transformer read from a GGUF file (scheduler thread).

Modules, one job each:

* `gguf_file`  - open and check a GGUF file, read its metadata, dequantize tensors to float32
* `tokenizer`  - the `tokenizers` tokenizer built from the file's vocabulary and merges
* `chat`       - the file's chat template rendered with jinja2
* `weights`    - the float32 weights laid out for the forward pass
* `model`      - the forward pass with a KV cache per slot
* `sampling`   - greedy / temperature / top-k / top-p / repeat penalty, one generator per slot
* `engine`     - `NumpyEngine`, the continuous-batching engine the scheduler drives

Every call into these modules comes from the scheduler thread, which owns the engine; numpy's
BLAS may use threads of its own inside a matrix product.
"""

from __future__ import annotations

__all__: list[str] = []
