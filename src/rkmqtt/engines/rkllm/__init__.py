"""The RKLLM engine: Rockchip's librkllmrt.so bound with ctypes, requests batched into one rkllm_run.

Modules (each docstring says which thread runs it):
    abi       ctypes structs, enums, callback type and function table for ABI 1.2.x and 1.3.0
    library   find the library without loading it, read its version, choose the ABI, load lazily
    prompt    messages -> the one prompt string the runtime's chat template wraps
    batch     one rkllm_run: its C inputs and the result callback that demultiplexes slots
    engine    RkllmEngine, the Engine interface (base.py) over all of the above
    platform  board checks for `rkmqtt check` and engine=auto

Importing this package loads no native code.
"""
