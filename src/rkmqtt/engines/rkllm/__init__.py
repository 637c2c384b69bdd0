"""The RKLLM engine: Rockchip's librkllmrt.so bound with ctypes, requests batched into one rkllm_run.

Modules (each docstring says which thread runs it):
    abi           ctypes structs, enums, callback type and function table for ABI 1.2.x and 1.3.0
    library       find the library without loading it, read its version, choose the ABI, load lazily
    prompt        messages -> the one prompt string the runtime's chat template wraps
    length        a prompt's tokens (counted or bounded), to refuse too_long before admission
    text          one slot's text pieces -> whole characters (WAITING steps)
    batch         one rkllm_run: its C inputs and the result callback that demultiplexes slots
    engine        RkllmEngine, the Engine interface (base.py) over all of the above
    platform      board checks for `rkmqtt check` and engine=auto; the SoC's default CPU cores
    trace         a record of every call into the runtime and every callback (for the probe)
    probe         `rkmqtt probe`: the command, its parts in child processes, the trace written as it goes
    probe_script  the probe's prompts, scenarios and parts (what each part asks)
    probe_child   one part of the probe, in a child process of its own
    probe_readings what a trace says: speed figures and the answer to each open question
    probe_report  the probe's Markdown summary
    board_state   clocks, governors, NPU memory and peak RSS, as the probe records them

Facts about the runtime: docs/rkllm-runtime.md.

Importing this package loads no native code.
"""
