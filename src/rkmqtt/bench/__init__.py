"""`rkmqtt bench`: the load generator and the benchmark report (main thread unless a module says so).

Modules, one job each:

* `prompts`   - the built-in home-automation prompts, or a file of them
* `workload`  - what a run sends: load shape, devices, requests, prompts, and the per-point plan
* `load`      - simulated devices (one paho client each) against a bridge over MQTT
* `direct`    - the same workload against an engine driven directly (no MQTT), for the bridge's cost
* `bridgeproc` - a bridge started as a `rkmqtt run` child process, and a private broker
* `standin`   - the stand-in RKLLM runtime: building it, its timing model, its environment
* `metrics`   - per-request records and per-run figures (percentiles, rates, errors)
* `sweep`     - the sweep over engines and n_batch values (and the built-in `targets` suite)
* `report`    - the terminal table, the JSON file and the PNG plot; the issue's targets
* `cli`       - argparse and wiring
"""
