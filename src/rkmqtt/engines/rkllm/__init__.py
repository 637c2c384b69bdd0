"""The RKLLM engine: Rockchip's librkllmrt.so bound with ctypes, requests batched into one
`rkllm_run`. Importing this package loads no native code. Its modules, threads and reasons:
docs/rkllm-runtime.md, "Inside rkmqtt's binding"."""
