"""`rkmqtt bench`: simulated devices against a bridge that runs, over MQTT and its HTTP API, and the
report (main thread unless a module says so). It works from an installed rkmqtt; the sweeps that
start their own bridges and engines are the repository's harness (`python -m benchmarks`)."""
