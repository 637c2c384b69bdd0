"""The benchmark harness, which needs this repository (the stand-in runtime's source, bridges it
starts): `python -m benchmarks` (`./dev bench`) sweeps engines and n_batch values; the modules
`numpy_engine`, `rkllm_standin` and `soak_bumping` are benchmarks of their own. What works from an
installed rkmqtt, against a bridge that runs, is `rkmqtt bench` (`rkmqtt.bench`)."""
